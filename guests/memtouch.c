/*
 * memtouch.c - memory guest for dirty tracking, snapshots and migration.
 *
 * 1. First touch: writes a pattern into every 64-byte line of the region and
 *    times it; 2. a second pass over the same lines, timed; 3. a steady phase
 *    that rewrites the first word of one page after another ("page value") at
 *    `rate` pages per second (TSC paced; after a stall it catches up), keeps
 *    an incremental sum of all page values, and once per tsc_hz cycles
 *    re-reads the whole region: every page value (re-summed) and every other
 *    line (must still hold its pattern).
 *
 * Parameters:
 *   mib=M      region size in MiB (default 64)
 *   base=A     region start (default 0x200000, 4 KiB aligned, above the image)
 *   rate=P     page writes per second in the steady phase (0 = flat out)
 *   secs=S     steady-phase run time in seconds (default 10; 0 = no limit)
 *   passes=K   also stop after K sweeps of page writes over the region
 *   tsc_hz=F   TSC frequency (default 2596000000), the check period
 *   idle=1     with rate>0, wait for the next due write on the idle doorbell
 *              instead of spinning, so a slow-paced guest costs little host CPU
 *
 * Output:
 *   memtouch base=0x.. mib=M rate=P secs=S passes=K
 *   memtouch first_touch_cycles=C pages=N
 *   memtouch second_pass_cycles=C
 *   memtouch t=<sec> writes=<n> sum=0x.. ok | MISMATCH bad=<words>  (per check)
 *   memtouch done t=.. writes=.. checks=.. mismatches=.. gap_max_cycles=.. ok|MISMATCH
 * Exit: 0 all checks ok, 1 a mismatch, 2 bad parameters.
 *
 * The monitor finds `struct progress progress` through the ELF symbol table.
 */
#include "lib.h"
#include "memtouch_pass.h"

enum phase {
    PHASE_START = 0,
    PHASE_FIRST_TOUCH = 1,
    PHASE_SECOND_PASS = 2,
    PHASE_STEADY = 3,
    PHASE_DONE = 4,
};

#define PROGRESS_MAGIC 0x3130474f5250544dull   /* "MTPROG01" little-endian */

/*
 * Progress stamps, updated in place (one cache line) so the monitor can read
 * them from guest memory at any time: tsc is the TSC of the latest stamp,
 * gap_max the largest TSC gap between consecutive stamps in the steady phase.
 */
struct progress {
    u64 magic;          /* +0  PROGRESS_MAGIC */
    u64 tsc;            /* +8  TSC at the latest stamp */
    u64 writes;         /* +16 page writes in the steady phase */
    u64 checks;         /* +24 verification passes completed */
    u64 mismatches;     /* +32 mismatching words found so far */
    u64 gap_max;        /* +40 largest gap between stamps (TSC cycles) */
    u64 phase;          /* +48 enum phase */
    u64 sum;            /* +56 incremental sum of the page values */
    u64 base;           /* +64 region start (GPA) */
    u64 pages;          /* +72 region size in pages */
};

__attribute__((used, aligned(64))) volatile struct progress progress;

struct state {
    u64 *region;
    u64 pages;
    u64 cursor;         /* next page to write */
    u64 writes;
    u64 sum;            /* incremental sum of the page values */
    u64 rate;
    u64 next_due;       /* TSC of the next due write (rate > 0) */
    u64 step, step_rem, rem;  /* tsc_hz / rate as quotient and remainder */
    u64 write_limit;    /* stop after this many writes (0 = none) */
    u64 idle;           /* wait for the next due write on the idle doorbell */
};

static inline void stamp(u64 now)
{
    u64 gap = now - progress.tsc;
    if (gap > progress.gap_max)
        progress.gap_max = gap;
    progress.tsc = now;
}

static inline u64 *page_word(struct state *s, u64 page)
{
    return s->region + page * (PAGE_SIZE / 8);
}

static inline u64 page_value(u64 write, u64 page)
{
    return (write + 1) * 0xd6e8feb86659fd93ull ^ page;
}

/* Steady phase: write page values until `until` (TSC) or the write limit. */
static HOT void steady_run(struct state *s, u64 until)
{
    for (;;) {
        u64 now = rdtsc();
        stamp(now);
        if ((s64)(now - until) >= 0)
            return;
        if (s->rate && (s64)(now - s->next_due) < 0) {
            if (s->idle) {
                u64 wake = (s64)(until - s->next_due) < 0 ? until : s->next_due;
                u64 usecs = (wake - now) / (boot.tsc_hz / 1000000 ? boot.tsc_hz / 1000000 : 1);
                idle_wait(usecs ? (u32)usecs : 1);
            } else {
                cpu_relax();
            }
            continue;
        }
        u64 *w = page_word(s, s->cursor);
        u64 v = page_value(s->writes, s->cursor);
        s->sum += v - *w;
        *w = v;
        if (++s->cursor == s->pages)
            s->cursor = 0;
        s->writes++;
        progress.writes = s->writes;
        progress.sum = s->sum;
        if (s->rate) {                  /* next_due += tsc_hz / rate, exactly */
            s->next_due += s->step;
            s->rem += s->step_rem;
            if (s->rem >= s->rate) {
                s->rem -= s->rate;
                s->next_due++;
            }
        }
        if (s->write_limit && s->writes >= s->write_limit)
            return;
    }
}

/* Re-reads the region: returns the sum of page values, counts bad lines. */
static HOT u64 verify_pass(struct state *s, u64 *bad)
{
    u64 sum = 0, nbad = 0;

    for (u64 p = 0; p < s->pages; p++) {
        const u64 *pg = page_word(s, p);
        sum += pg[0];
        for (u64 l = 1; l < LINES_PER_PAGE; l++)
            if (pg[l * WORDS_PER_LINE] != line_pattern(p * LINES_PER_PAGE + l))
                nbad++;
        if (progress.phase == PHASE_STEADY)
            stamp(rdtsc());
    }
    *bad = nbad;
    return sum;
}

/* One check; prints its line; returns true if everything matched. */
static bool check(struct state *s, u64 t0)
{
    u64 bad;
    u64 sum = verify_pass(s, &bad);
    bool ok = sum == s->sum && bad == 0;
    u64 t = (rdtsc() - t0) / boot.tsc_hz;

    progress.checks++;
    if (ok) {
        printf("memtouch t=%llu writes=%llu sum=0x%016llx ok\n", t, s->writes, sum);
    } else {
        u64 nbad = bad + (sum != s->sum);
        progress.mismatches += nbad;
        printf("memtouch t=%llu writes=%llu sum=0x%016llx MISMATCH bad=%llu expected_sum=0x%016llx\n",
               t, s->writes, sum, nbad, s->sum);
        s->sum = sum;                   /* resynchronise: report new damage only */
        progress.sum = sum;
    }
    return ok;
}

int main(void)
{
    u64 mib = param_u64("mib", 64);
    u64 base = param_u64("base", FREE_RAM_BASE);
    u64 rate = param_u64("rate", 0);
    u64 secs = param_u64("secs", 10);
    u64 passes = param_u64("passes", 0);

    printf("memtouch base=0x%llx mib=%llu rate=%llu secs=%llu passes=%llu\n",
           base, mib, rate, secs, passes);
    if (mib == 0 || base % PAGE_SIZE || base < (u64)_end ||
        base + (mib << 20) > 0xc0000000ull || !ram_contains(base, mib << 20)) {
        printf("memtouch error: region 0x%llx+%llu MiB is not free RAM\n", base, mib);
        return 2;
    }

    struct state s = {
        .region = (u64 *)base,
        .pages = (mib << 20) / PAGE_SIZE,
        .rate = rate,
        .write_limit = passes * ((mib << 20) / PAGE_SIZE),
        .idle = param_u64("idle", 0),
    };
    progress.base = base;
    progress.pages = s.pages;
    progress.magic = PROGRESS_MAGIC;

    progress.phase = PHASE_FIRST_TOUCH;
    u64 t0 = rdtsc();
    touch_pass(s.region, s.pages);
    u64 t1 = rdtsc();
    progress.phase = PHASE_SECOND_PASS;
    touch_pass(s.region, s.pages);
    u64 t2 = rdtsc();
    printf("memtouch first_touch_cycles=%llu pages=%llu\n", t1 - t0, s.pages);
    printf("memtouch second_pass_cycles=%llu\n", t2 - t1);

    /* The starting page values are the pattern's first words. */
    for (u64 p = 0; p < s.pages; p++)
        s.sum += *page_word(&s, p);
    progress.sum = s.sum;

    bool all_ok = true;
    u64 start = rdtsc();
    if (rate) {
        s.step = boot.tsc_hz / rate;
        s.step_rem = boot.tsc_hz % rate;
        s.next_due = start;
    }
    u64 next_check = start + boot.tsc_hz;
    progress.tsc = start;
    progress.gap_max = 0;
    progress.phase = PHASE_STEADY;
    for (;;) {
        steady_run(&s, next_check);     /* returns at next_check or the write limit */
        all_ok &= check(&s, start);
        if (s.write_limit && s.writes >= s.write_limit)
            break;
        if (secs && rdtsc() - start >= secs * boot.tsc_hz)
            break;
        next_check += boot.tsc_hz;
        if ((s64)(next_check - rdtsc()) < 0)  /* the check overran a period */
            next_check = rdtsc() + boot.tsc_hz;
    }
    progress.phase = PHASE_DONE;

    printf("memtouch done t=%llu writes=%llu checks=%llu mismatches=%llu gap_max_cycles=%llu %s\n",
           (rdtsc() - start) / boot.tsc_hz, s.writes, progress.checks, progress.mismatches,
           progress.gap_max, all_ok ? "ok" : "MISMATCH");
    return all_ok ? 0 : 1;
}
