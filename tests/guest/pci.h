/*
 * PCI configuration access (0xCF8/0xCFC and ECAM from the MCFG), bus scan and BAR helpers.
 * The virtio-pci drivers (later) build on pci_dev, pci_bar_* and pci_find_cap.
 */
#ifndef GUEST_PCI_H
#define GUEST_PCI_H

#include "guest.h"

struct pci_dev {
    u8 bus, dev, fn;
    u16 vendor, device;
    u32 class_code;     /* base class << 16 | subclass << 8 | prog-if */
    u8 header_type;     /* without the multi-function bit */
};

#define PCI_COMMAND 0x04
#define PCI_COMMAND_IO 0x1
#define PCI_COMMAND_MEMORY 0x2
#define PCI_COMMAND_MASTER 0x4
#define PCI_STATUS 0x06
#define PCI_STATUS_CAP_LIST 0x10
#define PCI_BAR0 0x10
#define PCI_CAP_PTR 0x34

/* Legacy mechanism #1 (ports 0xcf8/0xcfc), bus 0..255, offsets 0..255. */
u32 pci_cf8_read32(u8 bus, u8 dev, u8 fn, u16 off);
void pci_cf8_write32(u8 bus, u8 dev, u8 fn, u16 off, u32 v);
void pci_cf8_write8(u8 bus, u8 dev, u8 fn, u16 off, u8 v);

/* ECAM (memory-mapped config, offsets 0..4095); pci_ecam_base is 0 without an MCFG. */
extern u64 pci_ecam_base;
extern u8 pci_ecam_bus_start, pci_ecam_bus_end;
void pci_ecam_init(u64 base, u8 bus_start, u8 bus_end);
int pci_ecam_present(u8 bus);
u32 pci_ecam_read32(u8 bus, u8 dev, u8 fn, u16 off);
void pci_ecam_write32(u8 bus, u8 dev, u8 fn, u16 off, u32 v);

/* Config access for drivers: ECAM where it covers the bus, else 0xcf8 (then off < 256). */
u32 pci_read32(const struct pci_dev *d, u16 off);
void pci_write32(const struct pci_dev *d, u16 off, u32 v);
u16 pci_read16(const struct pci_dev *d, u16 off);
void pci_write16(const struct pci_dev *d, u16 off, u16 v);
u8 pci_read8(const struct pci_dev *d, u16 off);
void pci_write8(const struct pci_dev *d, u16 off, u8 v);

/* Scans one bus through 0xcf8; returns the number of functions stored (at most max). */
int pci_scan_bus(u8 bus, struct pci_dev *out, int max);
/* First device matching vendor/device (0xffff: any), scanning bus 0. */
int pci_find_device(u16 vendor, u16 device, int index, struct pci_dev *out);

/* BARs of a type-0 header. */
struct pci_bar {
    u64 addr;       /* 0: unassigned */
    u64 size;       /* 0: not implemented */
    int is_io, is_64, prefetchable;
};
/* Reads and sizes BAR n (decoding is switched off while sizing). Returns the number of BAR
 * slots it used (2 for a 64-bit memory BAR, else 1). */
int pci_bar_probe(const struct pci_dev *d, int n, struct pci_bar *bar);
void pci_bar_set(const struct pci_dev *d, int n, u64 addr);
/* Capability list walk: offset of the first capability `id` after `start` (0: from the list
 * head), 0 if none. */
u8 pci_find_cap(const struct pci_dev *d, u8 id, u8 start);
void pci_enable(const struct pci_dev *d, u16 command_bits);

#endif
