/* SPDX-License-Identifier: MIT */
/*
 * The one registration table of targets (contract: target.h). A device's
 * cfg.target is an index into it; Python learns names, options and flags
 * from it through us_target_info, so a new target is its file plus one line.
 */
#include <stddef.h>

#include "ushell.h"

/* every target, by the name its file defines (us_target_NAME): a new target is one line here */
#define US_TARGETS(X) \
	X(null) \
	X(mem) \
	X(loop) \
	X(pattern) \
	/* a new target: X(NAME) \ on a line of its own above this one */

#define US_TARGET_DECLARE(n) extern const struct us_target_type us_target_##n;
#define US_TARGET_ENTRY(n) &us_target_##n,

US_TARGETS(US_TARGET_DECLARE)

const struct us_target_type *const us_targets[] = {
	US_TARGETS(US_TARGET_ENTRY)
	NULL,
};

const struct us_target_type *us_target_type(int idx)
{
	int i;

	/* walk rather than index: idx comes from Python and the table's length is its NULL */
	for (i = 0; us_targets[i]; i++)
		if (i == idx)
			return us_targets[i];
	return NULL;
}

const struct us_target_info *us_target_info(int idx)
{
	const struct us_target_type *t = us_target_type(idx);

	return t ? &t->info : NULL;
}
