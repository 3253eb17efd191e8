/*
 * COM1 console: polled output, interrupt-driven input (IER bit 0 -> IOAPIC -> VEC_UART) into a
 * ring buffer, read line by line by the command loop. serial_poll() drains the UART by hand too,
 * so a byte that arrived before the IRQ was routed is not lost and the edge IRQ re-arms.
 */
#include "guest.h"

#define UART_RBR 0
#define UART_THR 0
#define UART_IER 1
#define UART_DLL 0
#define UART_DLM 1
#define UART_IIR 2
#define UART_FCR 2
#define UART_LCR 3
#define UART_MCR 4
#define UART_LSR 5
#define UART_MSR 6
#define LSR_DR 0x01
#define LSR_THRE 0x20

#define RX_SIZE 1024
static volatile u8 rx_buf[RX_SIZE];
static volatile u32 rx_head, rx_tail;      /* head: written by the IRQ handler */
static char line_acc[256];
static u32 line_len;

void serial_init(void)
{
    outb(COM1_BASE + UART_IER, 0x00);
    outb(COM1_BASE + UART_LCR, 0x80);      /* DLAB */
    outb(COM1_BASE + UART_DLL, 0x01);      /* 115200 */
    outb(COM1_BASE + UART_DLM, 0x00);
    outb(COM1_BASE + UART_LCR, 0x03);      /* 8N1 */
    outb(COM1_BASE + UART_FCR, 0x07);      /* FIFO on, cleared, RX trigger at 1 byte */
    outb(COM1_BASE + UART_MCR, 0x0b);      /* DTR, RTS, OUT2 (gates the IRQ on PCs) */
    (void)inb(COM1_BASE + UART_LSR);
    (void)inb(COM1_BASE + UART_MSR);
    (void)inb(COM1_BASE + UART_IIR);
}

void serial_enable_rx_irq(void)
{
    outb(COM1_BASE + UART_IER, 0x01);
    serial_poll();
}

void serial_putc(char c)
{
    /* Bounded: a missing UART reads 0xff (THRE set) anyway, a stuck one must not hang us. */
    for (u32 i = 0; i < 1000000 && !(inb(COM1_BASE + UART_LSR) & LSR_THRE); i++)
        pause();
    outb(COM1_BASE + UART_THR, (u8)c);
}

static void rx_push(u8 c)
{
    u32 h = rx_head;
    if (h - rx_tail < RX_SIZE) {
        rx_buf[h % RX_SIZE] = c;
        barrier();
        rx_head = h + 1;
    }
}

static void drain(void)
{
    for (int i = 0; i < 64; i++) {
        u8 lsr = inb(COM1_BASE + UART_LSR);
        if (lsr == 0xff || !(lsr & LSR_DR))
            break;
        rx_push(inb(COM1_BASE + UART_RBR));
    }
}

void serial_irq(void)
{
    (void)inb(COM1_BASE + UART_IIR);
    drain();
}

void serial_poll(void)
{
    u64 flags;
    __asm__ volatile("pushfq; popq %0; cli" : "=r"(flags)::"memory");
    drain();
    if (flags & 0x200)
        sti();
}

int serial_getline(char *buf, size_t size)
{
    while (rx_tail != rx_head) {
        char c = (char)rx_buf[rx_tail % RX_SIZE];
        barrier();
        rx_tail++;
        if (c == '\r')
            continue;
        if (c == '\n') {
            u32 n = line_len < size - 1 ? line_len : (u32)size - 1;
            memcpy(buf, line_acc, n);
            buf[n] = 0;
            line_len = 0;
            return (int)n;
        }
        if (line_len < sizeof(line_acc))
            line_acc[line_len++] = c;
    }
    return -1;
}

/* printf subset: %s %c %d %i %u %x %X %p, with l/ll/z, '0' padding and a width. */
static void put_num(u64 v, int base, int upper, int width, char pad, int neg)
{
    char tmp[24];
    const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
    int n = 0;
    do {
        tmp[n++] = digits[v % base];
        v /= base;
    } while (v);
    if (neg)
        width--;
    if (neg && pad == '0')
        serial_putc('-');
    for (; width > n; width--)
        serial_putc(pad);
    if (neg && pad != '0')
        serial_putc('-');
    while (n)
        serial_putc(tmp[--n]);
}

void kvprintf(const char *fmt, va_list ap)
{
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            serial_putc(*fmt);
            continue;
        }
        fmt++;
        char pad = ' ';
        int width = 0, longs = 0;
        if (*fmt == '0') {
            pad = '0';
            fmt++;
        }
        while (*fmt >= '0' && *fmt <= '9')
            width = width * 10 + (*fmt++ - '0');
        while (*fmt == 'l' || *fmt == 'z') {
            longs++;
            fmt++;
        }
        switch (*fmt) {
        case 's': {
            const char *s = va_arg(ap, const char *);
            int len = (int)strlen(s);
            for (; width > len; width--)
                serial_putc(' ');
            while (*s)
                serial_putc(*s++);
            break;
        }
        case 'c':
            serial_putc((char)va_arg(ap, int));
            break;
        case 'd':
        case 'i': {
            i64 v = longs ? va_arg(ap, i64) : va_arg(ap, int);
            put_num(v < 0 ? -(u64)v : (u64)v, 10, 0, width, pad, v < 0);
            break;
        }
        case 'u':
            put_num(longs ? va_arg(ap, u64) : va_arg(ap, unsigned), 10, 0, width, pad, 0);
            break;
        case 'x':
        case 'X':
            put_num(longs ? va_arg(ap, u64) : va_arg(ap, unsigned), 16, *fmt == 'X', width, pad, 0);
            break;
        case 'p':
            serial_putc('0');
            serial_putc('x');
            put_num((u64)va_arg(ap, void *), 16, 0, width, pad, 0);
            break;
        case '%':
            serial_putc('%');
            break;
        default:
            serial_putc('%');
            if (!*fmt)
                return;
            serial_putc(*fmt);
        }
    }
}

void kprintf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    kvprintf(fmt, ap);
    va_end(ap);
}
