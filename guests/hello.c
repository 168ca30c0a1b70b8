/*
 * hello.c - start-up guest: prints a greeting as its very first output (the
 * start-up benchmark times process start -> first serial byte), then the
 * command line it received, then exits with `status=` (default 0).
 *
 *   status=N   exit status (to test that the monitor passes it on)
 *
 * Output: HELLO from sealvm guest
 *         hello cmdline=<the command line>
 *         hello vcpus=N io_mode=M virtio_mmio=K
 */
#include "lib.h"

int main(void)
{
    puts("HELLO from sealvm guest");
    console_write("hello cmdline=", 14);
    console_write(boot.cmdline, strlen(boot.cmdline));
    console_write("\n", 1);
    printf("hello vcpus=%u io_mode=%u virtio_mmio=%u\n", boot.vcpus, io_mode, boot.n_virtio);
    return (int)param_u64("status", 0);
}
