//! Checking a command's `arguments` against the schema, before dispatch, with QEMU's answers.
//!
//! Modelled on QEMU 1.1's `qmp_check_client_args()` (monitor.c: `check_mandatory_args()` then
//! `check_client_args_type()`) and on current QEMU's QAPI input visitor, which replaced it:
//!
//! * The **class** and **`data`** are QEMU 1.1's (`qerror.h`), as the seed names them:
//!   `MissingParameter {name}`, `InvalidParameterType {name, expected}`,
//!   `InvalidParameter {name}`, `InvalidParameterValue {name, expected}`,
//!   `CommandNotFound {name}`, `QMPBadInputObjectMember {member, expected}`.
//! * The **`desc`** texts are those the QEMU 7.2 transcripts (`shared/qemu-7.2-qmp/errors/`)
//!   show, as `SUMMARY.md` there asks: "Parameter 'value' is missing",
//!   "Invalid parameter type for 'value', expected: integer", "Parameter 'foo' is unexpected",
//!   "The command X has not been found", "QMP input member 'arguments' must be an object".
//!   QEMU 1.1 worded two of them differently ("expected: int"/"bool" from monitor.c, and
//!   "Invalid parameter 'foo'"); `expected` in `data` is always the word `desc` uses.
//! * The **order** is the QAPI visitor's: the schema's members in order (missing, then wrong
//!   type, for each), then the first argument the schema does not know. QEMU 1.1 reported
//!   missing arguments first as well; its order among wrong types followed its hash table.
//!
//! Types: `str` wants a JSON string ("string"), `int`/`intN`/`uintN` an integer that fits
//! ("integer"; an `int` of 2^63 or more, or `1.0`, is refused, as QEMU does), `number` any JSON
//! number ("number"), `bool` true/false ("boolean"), an enum a string among its values, a struct
//! an object ("object", checked member by member as `outer.inner`), a list an array ("array",
//! elements as `name[i]`), `visitor` anything. A `null` is never a valid value.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::parse::Builtin;
use crate::table::{self, CommandSpec, Member, Ty};

/// Why a command's arguments were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgError {
    /// No command of that name.
    #[error("The command {name} has not been found")]
    CommandNotFound { name: String },
    /// `arguments` is present but not an object.
    #[error("QMP input member 'arguments' must be an object")]
    ArgumentsNotObject,
    /// A mandatory argument is absent.
    #[error("Parameter '{name}' is missing")]
    MissingParameter { name: String },
    /// An argument has the wrong JSON type.
    #[error("Invalid parameter type for '{name}', expected: {expected}")]
    InvalidParameterType { name: String, expected: &'static str },
    /// An argument the command does not take.
    #[error("Parameter '{name}' is unexpected")]
    UnexpectedParameter { name: String },
    /// A string that is not one of the enum's values.
    #[error("Parameter '{name}' does not accept value '{value}'")]
    InvalidEnumValue { name: String, value: String },
    /// An integer out of its sized type's range (`int8`, `uint16`...).
    #[error("Parameter '{name}' expects {expected}")]
    InvalidParameterValue { name: String, expected: &'static str },
}

impl ArgError {
    /// The QMP error class (QEMU 1.1's).
    pub fn class(&self) -> &'static str {
        match self {
            ArgError::CommandNotFound { .. } => "CommandNotFound",
            ArgError::ArgumentsNotObject => "QMPBadInputObjectMember",
            ArgError::MissingParameter { .. } => "MissingParameter",
            ArgError::InvalidParameterType { .. } => "InvalidParameterType",
            ArgError::UnexpectedParameter { .. } | ArgError::InvalidEnumValue { .. } => "InvalidParameter",
            ArgError::InvalidParameterValue { .. } => "InvalidParameterValue",
        }
    }

    /// The error's `data` object, as QEMU 1.1's `qerror.h` defines it for the class.
    pub fn data(&self) -> Value {
        match self {
            ArgError::CommandNotFound { name }
            | ArgError::MissingParameter { name }
            | ArgError::UnexpectedParameter { name }
            | ArgError::InvalidEnumValue { name, .. } => json!({ "name": name }),
            ArgError::ArgumentsNotObject => json!({ "member": "arguments", "expected": "object" }),
            ArgError::InvalidParameterType { name, expected } | ArgError::InvalidParameterValue { name, expected } => {
                json!({ "name": name, "expected": expected })
            }
        }
    }

    /// The error as the gateway sends it.
    pub fn to_qmp(&self) -> QmpError {
        QmpError { class: self.class().to_string(), desc: self.to_string(), data: Some(self.data()) }
    }
}

impl From<ArgError> for QmpError {
    fn from(e: ArgError) -> Self {
        e.to_qmp()
    }
}

/// A QMP error: the value of the reply's `"error"` member.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{class}: {desc}")]
pub struct QmpError {
    pub class: String,
    pub desc: String,
    /// QEMU 1.1 always sent `data` (`{}` when a class has no fields); `None` leaves it out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

impl QmpError {
    /// An error of `class` with `desc` and no data fields (`"data": {}`).
    pub fn new(class: impl Into<String>, desc: impl Into<String>) -> Self {
        QmpError { class: class.into(), desc: desc.into(), data: Some(Value::Object(Map::new())) }
    }
}

/// Finds `name` and checks `arguments` (absent = `{}`) against it.
pub fn check_command(name: &str, arguments: Option<&Value>) -> Result<&'static CommandSpec, ArgError> {
    let cmd = table::command(name).ok_or_else(|| ArgError::CommandNotFound { name: name.to_string() })?;
    check_arguments(cmd, arguments)?;
    Ok(cmd)
}

/// Checks `arguments` (absent = `{}`) against the command's `'data'`.
pub fn check_arguments(cmd: &CommandSpec, arguments: Option<&Value>) -> Result<(), ArgError> {
    match arguments {
        None => check_members(cmd.members, &Map::new(), ""),
        Some(Value::Object(map)) => check_members(cmd.members, map, ""),
        Some(_) => Err(ArgError::ArgumentsNotObject),
    }
}

fn full_name(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

fn check_members(members: &[Member], map: &Map<String, Value>, prefix: &str) -> Result<(), ArgError> {
    for m in members {
        let name = full_name(prefix, m.name);
        match map.get(m.name) {
            None if m.optional => {}
            None => return Err(ArgError::MissingParameter { name }),
            Some(v) => check_value(&m.ty, v, &name)?,
        }
    }
    if let Some(extra) = map.keys().find(|k| !members.iter().any(|m| m.name == k.as_str())) {
        return Err(ArgError::UnexpectedParameter { name: full_name(prefix, extra) });
    }
    Ok(())
}

/// The word QEMU uses in "expected: ..." for a type.
pub fn expected_word(ty: &Ty) -> &'static str {
    match ty {
        Ty::Builtin(Builtin::Str) | Ty::Enum(_) => "string",
        Ty::Builtin(Builtin::Number) => "number",
        Ty::Builtin(Builtin::Bool) => "boolean",
        Ty::Builtin(Builtin::Any) => "any",
        Ty::Builtin(_) => "integer",
        Ty::Struct(_) => "object",
        Ty::List(_) => "array",
    }
}

fn check_value(ty: &Ty, v: &Value, name: &str) -> Result<(), ArgError> {
    let wrong = || ArgError::InvalidParameterType { name: name.to_string(), expected: expected_word(ty) };
    match ty {
        Ty::Builtin(b) => {
            let ok = match b {
                Builtin::Any => true,
                Builtin::Str => v.is_string(),
                Builtin::Bool => v.is_boolean(),
                Builtin::Number => v.is_number(),
                _ => {
                    if !(v.is_i64() || v.is_u64()) {
                        return Err(wrong());
                    }
                    return check_int(*b, v, name);
                }
            };
            if ok {
                Ok(())
            } else {
                Err(wrong())
            }
        }
        Ty::Enum(e) => {
            let Value::String(s) = v else { return Err(wrong()) };
            let info = table::enum_spec(e).expect("the table names only known enums");
            if info.values.contains(&s.as_str()) {
                Ok(())
            } else {
                Err(ArgError::InvalidEnumValue { name: name.to_string(), value: s.clone() })
            }
        }
        Ty::Struct(s) => {
            let Value::Object(map) = v else { return Err(wrong()) };
            let info = table::struct_spec(s).expect("the table names only known structs");
            check_members(info.members, map, name)
        }
        Ty::List(element) => {
            let Value::Array(items) = v else { return Err(wrong()) };
            for (i, item) in items.iter().enumerate() {
                check_value(element, item, &format!("{name}[{i}]"))?;
            }
            Ok(())
        }
    }
}

/// An integer JSON value against a QAPI integer type's range.
fn check_int(b: Builtin, v: &Value, name: &str) -> Result<(), ArgError> {
    let (min, max): (i128, i128) = match b {
        Builtin::Int | Builtin::Int64 => (i64::MIN.into(), i64::MAX.into()),
        Builtin::Int8 => (i8::MIN.into(), i8::MAX.into()),
        Builtin::Int16 => (i16::MIN.into(), i16::MAX.into()),
        Builtin::Int32 => (i32::MIN.into(), i32::MAX.into()),
        Builtin::Uint8 => (0, u8::MAX.into()),
        Builtin::Uint16 => (0, u16::MAX.into()),
        Builtin::Uint32 => (0, u32::MAX.into()),
        Builtin::Uint64 => (0, u64::MAX.into()),
        _ => unreachable!("only integer types come here"),
    };
    let n: i128 = match (v.as_i64(), v.as_u64()) {
        (Some(i), _) => i.into(),
        (None, Some(u)) => u.into(),
        _ => unreachable!("checked to be an integer"),
    };
    if (min..=max).contains(&n) {
        return Ok(());
    }
    if matches!(b, Builtin::Int | Builtin::Int64) {
        // QEMU: an integer that does not fit int64 is not an "integer" at all.
        return Err(ArgError::InvalidParameterType { name: name.to_string(), expected: "integer" });
    }
    Err(ArgError::InvalidParameterValue { name: name.to_string(), expected: b.name() })
}
