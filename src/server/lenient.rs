//! Field readers that take what real clients send: booleans as `"true"`/`"false"` strings
//! (RAGFlow's Xinference client), integers as integer-valued floats (`10.0` from JavaScript or
//! Python clients that do arithmetic on `top_n`). Strict where leniency would hide a mistake: a
//! fraction, a negative number or a count beyond [`MAX_COUNT`] is refused, never rounded or
//! wrapped.

use serde::de::Error;
use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// The largest count a request may carry (`top_n`, `max_tokens_per_doc`): far above any
/// document list or token limit the server accepts, and small enough that no arithmetic on
/// it can overflow.
pub const MAX_COUNT: u64 = u32::MAX as u64;

/// `true`, `false`, `"true"`, `"false"` (any case), or absent/null.
pub fn opt_bool<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(b)),
        Some(Value::String(s)) if s.trim().eq_ignore_ascii_case("true") => Ok(Some(true)),
        Some(Value::String(s)) if s.trim().eq_ignore_ascii_case("false") => Ok(Some(false)),
        Some(other) => Err(D::Error::custom(format!(
            "expected a boolean (true or false), got {other}"
        ))),
    }
}

/// A non-negative whole number up to [`MAX_COUNT`], as an integer or an integer-valued float;
/// absent or null is `None`.
pub fn opt_count<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    let n = match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => n,
        Some(other) => {
            return Err(D::Error::custom(format!(
                "expected a whole number, got {other}"
            )))
        }
    };
    let whole = if let Some(u) = n.as_u64() {
        Some(u)
    } else if n.is_i64() {
        return Err(D::Error::custom(format!("must not be negative, got {n}")));
    } else {
        n.as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= MAX_COUNT as f64)
            .map(|f| f as u64)
    };
    match whole {
        Some(u) if u <= MAX_COUNT => Ok(Some(u as usize)),
        Some(u) => Err(D::Error::custom(format!(
            "{u} is beyond the largest accepted value, {MAX_COUNT}"
        ))),
        None => Err(D::Error::custom(format!(
            "expected a non-negative whole number of at most {MAX_COUNT}, got {n}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize, Debug)]
    struct Probe {
        #[serde(default, deserialize_with = "opt_bool")]
        flag: Option<bool>,
        #[serde(default, deserialize_with = "opt_count")]
        count: Option<usize>,
    }

    fn probe(json: &str) -> Result<Probe, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn booleans_may_come_as_strings() {
        assert_eq!(probe(r#"{"flag": true}"#).unwrap().flag, Some(true));
        assert_eq!(probe(r#"{"flag": "true"}"#).unwrap().flag, Some(true));
        assert_eq!(probe(r#"{"flag": "False"}"#).unwrap().flag, Some(false));
        assert_eq!(probe(r#"{"flag": null}"#).unwrap().flag, None);
        assert_eq!(probe("{}").unwrap().flag, None);
        for bad in [r#""yes""#, "1", "[]"] {
            let e = probe(&format!(r#"{{"flag": {bad}}}"#)).unwrap_err();
            assert!(e.contains("expected a boolean"), "{bad}: {e}");
        }
    }

    #[test]
    fn counts_take_whole_floats_and_refuse_what_would_wrap() {
        assert_eq!(probe(r#"{"count": 10}"#).unwrap().count, Some(10));
        assert_eq!(probe(r#"{"count": 10.0}"#).unwrap().count, Some(10));
        assert_eq!(probe(r#"{"count": 0}"#).unwrap().count, Some(0));
        assert_eq!(
            probe(r#"{"count": 4294967295}"#).unwrap().count,
            Some(u32::MAX as usize)
        );
        for bad in [
            "10.5",
            "-1",
            "-1.0",
            "18446744073709551611",
            "4294967296",
            "1e300",
            "\"10\"",
        ] {
            assert!(
                probe(&format!(r#"{{"count": {bad}}}"#)).is_err(),
                "{bad} accepted"
            );
        }
    }
}
