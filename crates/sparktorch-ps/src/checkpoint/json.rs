//! The JSON inside the metadata: floats (non-finite ones as strings) and hyperparameters.

use serde_json::{json, Value};
use sparktorch_optim::{HyperValue, Hyperparameters};

/// A float as JSON: a number when finite, else the string `"NaN"`, `"inf"` or `"-inf"`.
pub(super) fn f64_json(v: f64) -> Value {
    if v.is_finite() {
        json!(v)
    } else if v.is_nan() {
        json!("NaN")
    } else if v > 0.0 {
        json!("inf")
    } else {
        json!("-inf")
    }
}

/// The inverse of [`f64_json`].
pub(super) fn json_f64(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => match s.as_str() {
            "NaN" => Some(f64::NAN),
            "inf" => Some(f64::INFINITY),
            "-inf" => Some(f64::NEG_INFINITY),
            _ => None,
        },
        _ => None,
    }
}

/// Hyperparameters as a JSON object: numbers, bools, `[a, b]` pairs.
pub fn hyper_json(h: &Hyperparameters) -> Value {
    let mut m = serde_json::Map::new();
    for (k, v) in h {
        let v = match v {
            HyperValue::Float(f) => f64_json(*f),
            HyperValue::Bool(b) => json!(b),
            HyperValue::Pair(a, b) => json!([f64_json(*a), f64_json(*b)]),
        };
        m.insert(k.clone(), v);
    }
    Value::Object(m)
}

/// The inverse of [`hyper_json`].
pub(super) fn parse_hyper(v: &Value) -> Result<Hyperparameters, String> {
    let Value::Object(m) = v else {
        return Err("hyperparameters must be an object".into());
    };
    let mut out = Vec::with_capacity(m.len());
    for (k, v) in m {
        let hv = match v {
            Value::Bool(b) => HyperValue::Bool(*b),
            Value::Array(a) if a.len() == 2 => match (json_f64(&a[0]), json_f64(&a[1])) {
                (Some(x), Some(y)) => HyperValue::Pair(x, y),
                _ => return Err(format!("hyperparameters.{k} must be a pair of numbers")),
            },
            other => HyperValue::Float(
                json_f64(other)
                    .ok_or_else(|| format!("hyperparameters.{k} has an unsupported value"))?,
            ),
        };
        out.push((k.clone(), hv));
    }
    Ok(out)
}
