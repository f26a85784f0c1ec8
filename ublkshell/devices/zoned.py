"""Zoned devices (`add --zoned`), Python half: what the zone options mean together, and the
geometry `list` and `info` show. The zone state machine itself is native/zones.c; the mem
target (targets.MemTarget) opens its state file and fills the zoned params."""
from .._native import lib
from ..errors import UsageError
from ..units import human, parse_size

# --zone-size: null_blk's default; a chunk_sectors (u32) holds at most 2^31 sectors (1T)
DEFAULT_ZONE_SIZE = "256M"
MIN_ZONE_SIZE = 64 << 10
MAX_ZONE_SIZE = 1 << 40


def zone_geometry(z: dict, size: int) -> dict:
    """What `list` and `info` show of a zoned device (docs/schema.md, zoned)."""
    return {"zone_size": z["zone_size"], "zones": size // z["zone_size"], "conv_zones": z["conv_zones"],
            "max_open": z["max_open"], "max_active": z["max_active"]}


def check_zoned(spec: dict, targets: dict, zoned: bool, zone_size, conv_zones, max_open,
                max_active) -> dict | None:
    """`--zoned` and its geometry: {zone_size (bytes), conv_zones, max_open, max_active (0: no
    limit)}, or None. The numbers arrive range-checked (verbs.ADD_ARGS); what they mean
    together is checked here, each fault in one line."""
    given = [o for o, v in (("--zone-size", zone_size), ("--conv-zones", conv_zones),
                            ("--max-open", max_open), ("--max-active", max_active)) if v is not None]
    if not zoned:
        if given:
            raise UsageError(f"{given[0]} is for zoned devices: add --zoned")
        return None
    target = spec["target"]
    if not targets[target].zoned_ok:
        keep = ", ".join(n for n, t in targets.items() if t.zoned_ok)
        raise UsageError(f"--zoned: the {target} target has no zones (zoned targets: {keep})")
    if spec.get("transport") == "fuse":
        raise UsageError("--zoned is ublk's (UBLK_F_ZONED): a FUSE file has no zones")
    if spec.get("powercut"):
        raise UsageError("--powercut undoes data, not write pointers: it cannot be used with --zoned")
    if spec.get("zero_copy") in ("on", "fallback"):
        raise UsageError(f"--zero-copy {spec['zero_copy']}: the driver moves a zoned device's data "
                         "only by user copy (UBLK_F_USER_COPY); use --zero-copy auto or off")
    zs = parse_size(zone_size if zone_size is not None else DEFAULT_ZONE_SIZE, "--zone-size",
                    lo=MIN_ZONE_SIZE, hi=MAX_ZONE_SIZE)
    if zs & (zs - 1):
        raise UsageError(f"--zone-size: {zone_size} is not a power of two (e.g. 64M, 256M)")
    if zs < spec["block_size"]:
        raise UsageError(f"--zone-size: {zone_size} is smaller than the block size ({spec['block_size']})")
    size = spec["size"]
    if size % zs:
        raise UsageError(f"--size: {human(size)} is not a multiple of the zone size ({human(zs)})")
    nr = size // zs
    if nr > lib.US_ZONES_MAX:
        raise UsageError(f"--zone-size: {human(zs)} makes {nr} zones, more than {lib.US_ZONES_MAX}: "
                         "use larger zones")
    conv = conv_zones or 0
    if conv >= nr:
        raise UsageError(f"--conv-zones: {conv} leaves no sequential zone (the device has {nr} zones)")
    seq = nr - conv
    for opt, v in (("--max-open", max_open), ("--max-active", max_active)):
        if v is not None and v > seq:
            raise UsageError(f"{opt}: {v} is more than the {seq} sequential zones")
    if max_open is not None and max_active is not None and max_open > max_active:
        raise UsageError(f"--max-open: {max_open} is more than --max-active {max_active} "
                         "(an open zone is an active one)")
    return {"zone_size": zs, "conv_zones": conv, "max_open": max_open or 0, "max_active": max_active or 0}
