/*
 * Flotilla test guest: boot report, then the command loop of PROTOCOL.md.
 */
#include "guest.h"
#include "pci.h"
#include "virtio.h"

#define BOOT_MARKER_PORT 0x80
#define TICK_US 100000

static char line[256];

static void handle_power_button(void)
{
    if (!power_button_pending)
        return;
    power_button_pending = 0;
    kprintf("POWER-BUTTON\n");
    acpi_poweroff();
}

/* Waits for the next command line; the idle loop is sti;hlt woken by the UART (or SCI) IRQ. */
static int next_line(void)
{
    for (;;) {
        cli();
        serial_poll();
        int n = serial_getline(line, sizeof(line));
        if (n >= 0) {
            sti();
            return n;
        }
        if (power_button_pending) {
            sti();
            handle_power_button();
            continue;
        }
        /* Device events (config changes, returned stats buffers) are handled here, in the
         * loop, not in the ISR: the MSI only counts and wakes the hlt. */
        if (blk_pending() || balloon_pending()) {
            sti();
            blk_poll();
            balloon_poll();
            continue;
        }
        sti_hlt();
    }
}

static void cmd_spin(void)
{
    u64 n = 0;
    u64 next = tsc_deadline_us(TICK_US);
    for (;;) {
        serial_poll();
        if (serial_getline(line, sizeof(line)) >= 0)
            return;     /* the caller runs that line as the next command */
        handle_power_button();
        if (tsc_passed(next)) {
            kprintf("TICK %lu\n", ++n);
            next += TICK_US * tsc_khz / 1000;
            if (tsc_passed(next))       /* fell behind (descheduled): don't burst */
                next = tsc_deadline_us(TICK_US);
        }
        pause();
    }
}

static int split(char *s, char **argv, int max)
{
    int n = 0;
    while (*s) {
        while (*s == ' ' || *s == '\t')
            *s++ = 0;
        if (!*s)
            break;
        if (n < max)
            argv[n++] = s;
        while (*s && *s != ' ' && *s != '\t')
            s++;
    }
    return n;
}

static void cmd_write(int argc, char **argv, const char *orig)
{
    u64 vaddr, pattern, len, paddr, pend;
    if (argc != 4 || parse_u64(argv[1], 16, &vaddr) || parse_u64(argv[2], 16, &pattern) ||
        pattern > 0xffffffffull || parse_u64(argv[3], 10, &len)) {
        kprintf("ERR usage %s\n", orig);
        return;
    }
    if (len == 0 || vaddr + len < vaddr || virt_to_phys(vaddr, &paddr) ||
        virt_to_phys(vaddr + len - 1, &pend) || pend != paddr + len - 1) {
        kprintf("ERR unmapped %s\n", orig);
        return;
    }
    volatile u8 *p = (volatile u8 *)vaddr;
    for (u64 i = 0; i < len; i++)
        p[i] = (u8)(pattern >> (8 * (i & 3)));
    kprintf("WROTE 0x%lx 0x%lx\n", vaddr, paddr);
}

static void cmd_triplefault(void)
{
    static const struct {
        u16 limit;
        u64 base;
    } PACKED empty = {0, 0};
    kprintf("TRIPLEFAULT\n");
    cli();
    __asm__ volatile("lidt %0; ud2" ::"m"(empty));
    halt_forever();
}

static void cmd_kbdreset(void)
{
    kprintf("RESETTING\n");
    cli();
    for (int i = 0; i < 100000 && (inb(0x64) & 0x02); i++)
        pause();        /* input buffer full: wait (bounded) */
    outb(0x64, 0xfe);
    delay_us(1000000);
    sti();
    kprintf("ERR kbdreset still-running\n");
}

/* Jumps to a guest-virtual address (with interrupts off), e.g. into the unassigned MMIO hole
 * to make the hypervisor fail to fetch an instruction. */
static void cmd_jump(int argc, char **argv, const char *orig)
{
    u64 target;
    if (argc != 2 || parse_u64(argv[1], 16, &target)) {
        kprintf("ERR usage %s\n", orig);
        return;
    }
    kprintf("JUMPING 0x%lx\n", target);
    cli();
    __asm__ volatile("jmp *%0" ::"r"(target));
    __builtin_unreachable();
}

static void run_command(char *l)
{
    char orig[sizeof(line)];
    memcpy(orig, l, sizeof(orig));
    char *argv[8];
    int argc = split(l, argv, 8);
    if (argc == 0)
        return;
    const char *c = argv[0];
    if (!strcmp(c, "ping")) {
        kprintf("PONG\n");
    } else if (!strcmp(c, "halt")) {
        kprintf("HALTING\n");
        halt_forever();
    } else if (!strcmp(c, "write")) {
        cmd_write(argc, argv, orig);
    } else if (!strcmp(c, "nmis")) {
        nmi_report();
    } else if (!strcmp(c, "vectors")) {
        vectors_report();
    } else if (!strcmp(c, "jump")) {
        cmd_jump(argc, argv, orig);
    } else if (!strcmp(c, "poweroff")) {
        acpi_poweroff();
    } else if (!strcmp(c, "reset")) {
        acpi_reset();
    } else if (!strcmp(c, "kbdreset")) {
        cmd_kbdreset();
    } else if (!strcmp(c, "triplefault")) {
        cmd_triplefault();
    } else if (!strcmp(c, "mark")) {
        outb(BOOT_MARKER_PORT, 0x01);
        kprintf("MARKED\n");
    } else if (!strcmp(c, "cpus")) {
        cpus_report();
    } else if (!strcmp(c, "mem")) {
        mem_report();
    } else if (!strcmp(c, "pci")) {
        pci_report();
    } else if (!strcmp(c, "acpi")) {
        acpi_report();
    } else if (!strcmp(c, "tsc")) {
        tsc_report();
    } else if (!strcmp(c, "cmdline")) {
        kprintf("CMDLINE %s\n", bootinfo.cmdline);
    } else if (!strcmp(c, "virtio")) {
        virtio_report();
    } else if (blk_command(argc, argv, orig) || balloon_command(argc, argv, orig)) {
        /* handled */
    } else if (!strcmp(c, "ud2")) {
        kprintf("UD2\n");
        __asm__ volatile("ud2");
    } else {
        kprintf("ERR unknown %s\n", orig);
    }
}

static void command_loop(void)
{
    for (;;) {
        next_line();
        /* `spin` ends when the next line arrives; that line is then run as a command. */
        for (;;) {
            char *argv[2];
            char tmp[sizeof(line)];
            memcpy(tmp, line, sizeof(tmp));
            if (split(tmp, argv, 2) == 1 && !strcmp(argv[0], "spin")) {
                cmd_spin();
                continue;
            }
            run_command(line);
            break;
        }
    }
}

void kmain(u32 start_info_paddr)
{
    serial_init();
    bootinfo_copy(start_info_paddr);     /* before anything below 1 MiB is written */
    u32 boot_count = boot_counter_bump();
    idt_init();
    kprintf("FLOTILLA-GUEST v1 boot=%u\n", boot_count);
    mem_report();

    acpi_init(bootinfo.rsdp_paddr);
    acpi_report();

    pic_disable();
    lapic_init();
    ioapic_init();
    tsc_calibrate();

    smp_start();
    cpus_report();

    pci_ecam_init(acpi.mcfg_base, acpi.mcfg_bus_start, acpi.mcfg_bus_end);
    pci_report();
    tsc_report();

    acpi_enable_events();
    ioapic_route_isa(COM1_ISA_IRQ, VEC_UART, 0, 0);
    serial_enable_rx_irq();
    sti();
    kprintf("READY\n");
    command_loop();
}
