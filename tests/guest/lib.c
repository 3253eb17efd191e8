/* The few C library functions the guest (and gcc's generated code) needs. */
#include "guest.h"

/* String instructions: one instruction per call rather than one per byte, which matters where
 * the guest's instructions are emulated one by one (kvm_pvm runs it at about a million
 * instructions a second). */
void *memset(void *d, int c, size_t n)
{
    void *p = d;
    size_t q = n / 8, r = n % 8;
    u64 v = 0x0101010101010101ull * (u8)c;
    __asm__ volatile("rep stosq" : "+D"(p), "+c"(q) : "a"(v) : "memory");
    __asm__ volatile("rep stosb" : "+D"(p), "+c"(r) : "a"(v) : "memory");
    return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
    void *dp = d;
    __asm__ volatile("rep movsb" : "+D"(dp), "+S"(s), "+c"(n) : : "memory");
    return d;
}

void *memmove(void *d, const void *s, size_t n)
{
    u8 *dp = d;
    const u8 *sp = s;
    if (dp < sp) {
        while (n--)
            *dp++ = *sp++;
    } else {
        while (n--)
            dp[n] = sp[n];
    }
    return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const u8 *x = a, *y = b;
    for (; n; n--, x++, y++)
        if (*x != *y)
            return *x - *y;
    return 0;
}

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

int strcmp(const char *a, const char *b)
{
    while (*a && *a == *b) {
        a++;
        b++;
    }
    return (u8)*a - (u8)*b;
}

int parse_u64(const char *s, int base, u64 *out)
{
    u64 v = 0;
    int digits = 0;
    if (base == 16 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X'))
        s += 2;
    for (; *s; s++) {
        u32 d;
        if (*s >= '0' && *s <= '9')
            d = *s - '0';
        else if (base == 16 && *s >= 'a' && *s <= 'f')
            d = *s - 'a' + 10;
        else if (base == 16 && *s >= 'A' && *s <= 'F')
            d = *s - 'A' + 10;
        else
            return -1;
        if (v > (~0ull - d) / base)
            return -1;  /* overflow */
        v = v * base + d;
        digits++;
    }
    if (!digits)
        return -1;
    *out = v;
    return 0;
}

void halt_forever(void)
{
    for (;;)
        cli_hlt();      /* NMIs still wake it, get counted, and return here */
}

/* Slicing-by-8 (eight 256-entry tables, built on first use): eight bytes a step, about half the
 * instructions of the one-table loop, which counts where the guest is emulated (kvm_pvm). */
u32 crc32_update(u32 crc, const void *data, size_t n)
{
    static u32 t[8][256];
    static int ready;
    if (!ready) {
        for (u32 i = 0; i < 256; i++) {
            u32 c = i;
            for (int k = 0; k < 8; k++)
                c = (c >> 1) ^ (0xedb88320u & -(c & 1));
            t[0][i] = c;
        }
        for (u32 i = 0; i < 256; i++)
            for (int k = 1; k < 8; k++)
                t[k][i] = (t[k - 1][i] >> 8) ^ t[0][t[k - 1][i] & 0xff];
        ready = 1;
    }
    const u8 *p = data;
    crc = ~crc;
    for (; n >= 8; n -= 8, p += 8) {
        u32 lo = (p[0] | (u32)p[1] << 8 | (u32)p[2] << 16 | (u32)p[3] << 24) ^ crc;
        u32 hi = p[4] | (u32)p[5] << 8 | (u32)p[6] << 16 | (u32)p[7] << 24;
        crc = t[7][lo & 0xff] ^ t[6][(lo >> 8) & 0xff] ^ t[5][(lo >> 16) & 0xff] ^ t[4][lo >> 24] ^
              t[3][hi & 0xff] ^ t[2][(hi >> 8) & 0xff] ^ t[1][(hi >> 16) & 0xff] ^ t[0][hi >> 24];
    }
    while (n--)
        crc = t[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}
