/*
 * memtouch_pass.h - the memory passes shared by the memtouch guest and the
 * native_memtouch host baseline: the fill pattern and the pass that writes
 * it into every 64-byte line of a region.
 */
#ifndef MEMTOUCH_PASS_H
#define MEMTOUCH_PASS_H

#ifdef GUEST
#include "lib.h"
#else
#include <stdint.h>
typedef uint64_t u64;
#define HOT __attribute__((noinline, aligned(64)))
#endif

#define PAGE_SIZE       4096ull
#define LINE_SIZE       64ull
#define LINES_PER_PAGE  (PAGE_SIZE / LINE_SIZE)
#define WORDS_PER_LINE  (LINE_SIZE / 8)

/* Value of the first word of line `line` (counted from the region start). */
static inline u64 line_pattern(u64 line)
{
    return (line + 1) * 0x9e3779b97f4a7c15ull ^ 0x5851f42d4c957f2dull;
}

/* Writes line_pattern() into the first word of every line of `pages` pages. */
void touch_pass(u64 *region, u64 pages);

#endif
