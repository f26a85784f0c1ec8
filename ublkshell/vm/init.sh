#!/bin/busybox sh
# /init of the ublkshell VM initramfs (see harness.py). Mounts the host's / over 9p and
# switch_roots into it, so the guest runs the host's own tools, venvs and checkouts.
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in netfs 9pnet 9pnet_virtio 9p; do insmod /mods/$m.ko 2>/dev/null; done
mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288,cache=loose host /newroot \
  || { echo "vm: 9p mount failed"; poweroff -f; }
job=$(sed -n 's/.*vmjob=\([^ ]*\).*/\1/p' /proc/cmdline)
modroot=$(sed -n 's/.*vmmods=\([^ ]*\).*/\1/p' /proc/cmdline)
for d in proc sys dev; do mount --move /$d /newroot/$d; done
mkdir -p /newroot/dev/pts /newroot/dev/shm
# Guest-private scratch space: the host's /dev/shm and /run must not be written by the guest.
mount -t devpts devpts /newroot/dev/pts; mount -t tmpfs tmpfs /newroot/dev/shm; mount -t tmpfs tmpfs /newroot/run
# as systemd does on the machines users run: blk-mq's debugfs (the daemon's requeue kick)
mount -t debugfs debugfs /newroot/sys/kernel/debug 2>/dev/null
# The kernel's module autoload (mount -t ext4, xfs, ...) runs /sbin/modprobe, which looks in
# /lib/modules; the host's tree is for another kernel, so the VM kernel's tree is bound over it.
mkdir -p /newroot/usr/lib/modules 2>/dev/null
mount --bind "/newroot$modroot/usr/lib/modules" /newroot/usr/lib/modules
# switch_root, not chroot: with chroot the kernel's autoload helper runs in the initramfs root
# and finds no modules ("unknown filesystem type").
# After the power-off request only bash builtins may run: 9p goes away during shutdown, an
# external sleep then fails, init exits and the kernel panics. read -t on a fifo nobody writes
# is a builtin sleep.
exec switch_root /newroot /bin/bash -c "bash $job/cmd > /dev/console 2>&1; echo \$? > $job/rc; sync; mkfifo /run/vm-wait; echo o > /proc/sysrq-trigger; read -t 30 <> /run/vm-wait"
