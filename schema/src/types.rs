//! The schema's types: a struct per `'type'` (and per nested anonymous struct, named after its
//! parent and member: `VersionInfoQemu`, `PciBridgeInfoBus`, `PciDeviceInfoClassInfo`,
//! `PciDeviceInfoId`) and an enum per `'enum'`.
//!
//! Field names are the wire names in snake case (`io-status` → `io_status`, `UUID` → `uuid`,
//! `type` → `type_`); every field whose Rust name differs carries `#[serde(rename)]`, so the
//! JSON is exactly the schema's. Where two wire names fold to one Rust name (`CpuInfo`'s `pc` and
//! `PC`), the upper-case one gets `_upper` (`pc_upper`). Optional members are `Option`s, left
//! out of the JSON when `None`. Unknown fields are ignored when deserializing.
//!
//! QAPI builtins map as QEMU's C does: `str` → `String`, `int` → `i64`, `intN`/`uintN` →
//! `iN`/`uN`, `number` → `f64`, `bool` → `bool`, `visitor` (any JSON value) →
//! `serde_json::Value`.

use serde::{Deserialize, Serialize};

include!(concat!(env!("OUT_DIR"), "/types.rs"));

/// The empty object: the arguments of a command without `'data'`, and the `{"return": {}}` of a
/// command without `'returns'`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Empty {}
