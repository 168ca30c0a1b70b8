/*
 * memtouch_pass.c - writes the memtouch pattern into every 64-byte line of a
 * region (so every page is touched).  Used for the first-touch and second
 * passes by the guest and by native_memtouch.
 */
#include "memtouch_pass.h"

HOT void touch_pass(u64 *region, u64 pages)
{
    u64 lines = pages * LINES_PER_PAGE;

    for (u64 l = 0; l < lines; l++)
        region[l * WORDS_PER_LINE] = line_pattern(l);
}
