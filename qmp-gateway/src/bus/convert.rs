//! QMP arguments (JSON) to D-Bus method arguments, and D-Bus results back to JSON, following
//! the schema crate's mapping (`flotilla_schema::dbus`): scalars as their D-Bus types, lists as
//! arrays, an optional argument as an array of zero or one element, struct-shaped values and
//! `visitor` as the JSON text of the value.
//!
//! Values are built dynamically from each [`Method`]'s signatures, so no method is restated by
//! hand. The arguments have passed `check_command` before they get here; a value that still
//! does not fit its signature is reported, never panicked on.

use flotilla_schema::dbus::{Arg, Method};
use serde_json::{Map, Value};
use zbus::wire::{Array, Signature, Str, Structure, StructureBuilder, Variant};

/// Why a value could not be converted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConvertError(pub String);

fn fail<T>(msg: impl Into<String>) -> Result<T, ConvertError> {
    Err(ConvertError(msg.into()))
}

fn signature(s: &str) -> Result<Signature, ConvertError> {
    Signature::try_from(s).map_err(|e| ConvertError(format!("bad signature '{s}': {e}")))
}

/// One JSON value as a D-Bus value of signature `sig` (not JSON-carried).
fn to_variant(sig: &str, v: &Value, name: &str) -> Result<Variant<'static>, ConvertError> {
    let int = |v: &Value| -> Result<i128, ConvertError> {
        match (v.as_i64(), v.as_u64()) {
            (Some(i), _) => Ok(i.into()),
            (None, Some(u)) => Ok(u.into()),
            _ => fail(format!("'{name}' is not an integer")),
        }
    };
    let range = |n: i128| -> ConvertError { ConvertError(format!("'{name}' = {n} does not fit D-Bus type '{sig}'")) };
    Ok(match sig {
        "s" => match v {
            Value::String(s) => Variant::Str(Str::from(s.clone())),
            _ => return fail(format!("'{name}' is not a string")),
        },
        "b" => match v {
            Value::Bool(b) => Variant::Bool(*b),
            _ => return fail(format!("'{name}' is not a boolean")),
        },
        "d" => match v.as_f64() {
            Some(f) => Variant::F64(f),
            None => return fail(format!("'{name}' is not a number")),
        },
        "x" => {
            let n = int(v)?;
            Variant::I64(i64::try_from(n).map_err(|_| range(n))?)
        }
        "t" => {
            let n = int(v)?;
            Variant::U64(u64::try_from(n).map_err(|_| range(n))?)
        }
        "i" => {
            let n = int(v)?;
            Variant::I32(i32::try_from(n).map_err(|_| range(n))?)
        }
        "u" => {
            let n = int(v)?;
            Variant::U32(u32::try_from(n).map_err(|_| range(n))?)
        }
        "n" => {
            let n = int(v)?;
            Variant::I16(i16::try_from(n).map_err(|_| range(n))?)
        }
        "q" => {
            let n = int(v)?;
            Variant::U16(u16::try_from(n).map_err(|_| range(n))?)
        }
        "y" => {
            let n = int(v)?;
            Variant::U8(u8::try_from(n).map_err(|_| range(n))?)
        }
        _ if sig.starts_with('a') => {
            let elem = &sig[1..];
            let Value::Array(items) = v else { return fail(format!("'{name}' is not an array")) };
            let mut arr = Array::new(&signature(elem)?);
            for (i, item) in items.iter().enumerate() {
                let x = to_variant(elem, item, &format!("{name}[{i}]"))?;
                arr.append(x).map_err(|e| ConvertError(format!("'{name}[{i}]': {e}")))?;
            }
            Variant::Array(arr)
        }
        _ => return fail(format!("unsupported D-Bus signature '{sig}' for '{name}'")),
    })
}

/// The value of one argument (or result) with its [`Arg`] description.
fn arg_variant(arg: &Arg, v: &Value) -> Result<Variant<'static>, ConvertError> {
    let (sig, optional) = if arg.optional {
        (arg.signature.strip_prefix('a').unwrap_or(&arg.signature), true)
    } else {
        (&arg.signature[..], false)
    };
    let one = |v: &Value| -> Result<Variant<'static>, ConvertError> {
        if arg.json_type.is_some() {
            Ok(Variant::Str(Str::from(serde_json::to_string(v).expect("JSON serializes"))))
        } else {
            to_variant(sig, v, arg.qapi_name)
        }
    };
    if optional {
        let mut arr = Array::new(&signature(sig)?);
        arr.append(one(v)?).map_err(|e| ConvertError(format!("'{}': {e}", arg.qapi_name)))?;
        Ok(Variant::Array(arr))
    } else {
        one(v)
    }
}

/// The method call's body: `None` for a method without arguments.
pub fn encode_arguments(
    method: &Method,
    args: &Map<String, Value>,
) -> Result<Option<Structure<'static>>, ConvertError> {
    if method.in_args.is_empty() {
        return Ok(None);
    }
    let mut b = StructureBuilder::new();
    for arg in &method.in_args {
        let v = match (args.get(arg.qapi_name), arg.optional) {
            (Some(v), _) => arg_variant(arg, v)?,
            (None, true) => {
                let inner = arg.signature.strip_prefix('a').unwrap_or(&arg.signature);
                Variant::Array(Array::new(&signature(inner)?))
            }
            (None, false) => return fail(format!("'{}' is missing", arg.qapi_name)),
        };
        b.push_value(v);
    }
    b.build().map(Some).map_err(|e| ConvertError(format!("building the arguments: {e}")))
}

/// A D-Bus value back to JSON.
fn variant_to_json(v: &Variant<'_>) -> Result<Value, ConvertError> {
    Ok(match v {
        Variant::U8(x) => (*x).into(),
        Variant::Bool(x) => (*x).into(),
        Variant::I16(x) => (*x).into(),
        Variant::U16(x) => (*x).into(),
        Variant::I32(x) => (*x).into(),
        Variant::U32(x) => (*x).into(),
        Variant::I64(x) => (*x).into(),
        Variant::U64(x) => (*x).into(),
        Variant::F64(x) => serde_json::Number::from_f64(*x)
            .map(Value::Number)
            .ok_or_else(|| ConvertError(format!("{x} is not finite")))?,
        Variant::Str(s) => Value::String(s.as_str().to_string()),
        Variant::ObjectPath(p) => Value::String(p.as_str().to_string()),
        Variant::Signature(s) => Value::String(s.to_string()),
        Variant::Variant(inner) => variant_to_json(inner)?,
        Variant::Array(a) => Value::Array(a.inner().iter().map(variant_to_json).collect::<Result<_, _>>()?),
        Variant::Structure(s) => Value::Array(s.fields().iter().map(variant_to_json).collect::<Result<_, _>>()?),
        Variant::Dict(_) => return fail("a dictionary where the contract has none"),
        #[cfg(unix)]
        Variant::Fd(_) => return fail("a file descriptor where the contract has none"),
    })
}

/// The reply's fields (the body as a structure's fields) to the command's `return`: `{}` for a
/// command that returns nothing, the parsed JSON text for a JSON-carried result, else the value.
pub fn decode_result(method: &Method, body_signature: &str, fields: &[Variant<'_>]) -> Result<Value, ConvertError> {
    let Some(out) = &method.out else {
        return Ok(Value::Object(Map::new()));
    };
    if body_signature != out.signature {
        return fail(format!("result signature '{body_signature}', expected '{}'", out.signature));
    }
    let [v] = fields else { return fail(format!("{} results, expected 1", fields.len())) };
    if out.json_type.is_some() {
        let Variant::Str(s) = v else { return fail("the JSON result is not a string") };
        return serde_json::from_str(s.as_str())
            .map_err(|e| ConvertError(format!("the result is not valid JSON: {e}")));
    }
    variant_to_json(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_schema::{dbus, table};
    use serde_json::json;

    fn method(name: &str) -> Method {
        dbus::method(table::command(name).unwrap())
    }

    fn args(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn sig(s: &Structure<'_>) -> String {
        s.signature().to_string_no_parens()
    }

    #[test]
    fn arguments_follow_the_schema_signatures() {
        let m = method("memsave");
        let s = encode_arguments(&m, &args(json!({"val": -4096, "size": 16, "filename": "/x", "cpu-index": 1})))
            .unwrap()
            .unwrap();
        assert_eq!(sig(&s), m.in_signature());
        assert_eq!(sig(&s), "xxsax");
        assert_eq!(s.fields()[0], Variant::I64(-4096));
        let Variant::Array(a) = &s.fields()[3] else { panic!() };
        assert_eq!(a.inner(), &[Variant::I64(1)]);
        // An absent optional argument is an empty array.
        let s = encode_arguments(&m, &args(json!({"val": 0, "size": 16, "filename": "/x"}))).unwrap().unwrap();
        assert_eq!(sig(&s), "xxsax");
        let Variant::Array(a) = &s.fields()[3] else { panic!() };
        assert!(a.is_empty());

        assert!(encode_arguments(&method("query-status"), &Map::new()).unwrap().is_none());
        let s = encode_arguments(&method("set_link"), &args(json!({"name": "nic0", "up": false}))).unwrap().unwrap();
        assert_eq!(sig(&s), "sb");
        let s = encode_arguments(&method("migrate_set_downtime"), &args(json!({"value": 2}))).unwrap().unwrap();
        assert_eq!(s.fields()[0], Variant::F64(2.0));
        let s =
            encode_arguments(&method("blockdev-snapshot-sync"), &args(json!({"device": "d", "snapshot-file": "f"})))
                .unwrap()
                .unwrap();
        assert_eq!(sig(&s), "ssas");
    }

    #[test]
    fn visitor_travels_as_json_text() {
        let m = method("qom-set");
        let s = encode_arguments(&m, &args(json!({"path": "/m", "property": "p", "value": {"a": [1, true]}})))
            .unwrap()
            .unwrap();
        assert_eq!(sig(&s), "sss");
        assert_eq!(s.fields()[2], Variant::Str(Str::from(r#"{"a":[1,true]}"#)));
    }

    #[test]
    fn results() {
        let status = Variant::Str(Str::from(r#"{"running": true, "singlestep": false, "status": "running"}"#));
        assert_eq!(
            decode_result(&method("query-status"), "s", std::slice::from_ref(&status)).unwrap(),
            json!({"running": true, "singlestep": false, "status": "running"})
        );
        assert_eq!(decode_result(&method("stop"), "", &[]).unwrap(), json!({}));
        let hmp = Variant::Str(Str::from("text\r\n"));
        assert_eq!(decode_result(&method("human-monitor-command"), "s", &[hmp]).unwrap(), json!("text\r\n"));
        let bad = Variant::Str(Str::from("{not json"));
        assert!(decode_result(&method("query-status"), "s", &[bad]).unwrap_err().0.contains("not valid JSON"));
        assert!(decode_result(&method("query-status"), "x", &[Variant::I64(1)]).unwrap_err().0.contains("signature"));
    }

    #[test]
    fn out_of_range_is_reported() {
        let e = to_variant("y", &json!(300), "n").unwrap_err();
        assert_eq!(e.0, "'n' = 300 does not fit D-Bus type 'y'");
        assert_eq!(to_variant("t", &json!(u64::MAX), "n").unwrap(), Variant::U64(u64::MAX));
        assert!(to_variant("x", &json!(u64::MAX), "n").is_err());
        assert_eq!(variant_to_json(&to_variant("ai", &json!([1, -2]), "l").unwrap()).unwrap(), json!([1, -2]));
    }
}
