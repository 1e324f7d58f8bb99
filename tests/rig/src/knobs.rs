//! Environment knobs of the benches and tests (`CHATOP_BENCH_*` and the like), all read one way:
//! an unset or blank variable takes the default, a value is trimmed and parsed, and a value that
//! does not parse is an error naming the variable, the value and why — never a silent default.

use std::fmt::Display;
use std::str::FromStr;

use anyhow::{Result, anyhow};

/// The knob's value, or `default` when it is unset or blank.
pub fn get<T>(name: &str, default: T) -> Result<T>
where
    T: FromStr,
    T::Err: Display,
{
    Ok(optional(name)?.unwrap_or(default))
}

/// The knob's value, or `None` when it is unset or blank (the caller's own default applies).
pub fn optional<T>(name: &str) -> Result<Option<T>>
where
    T: FromStr,
    T::Err: Display,
{
    parse(name, std::env::var(name).ok().as_deref())
}

/// A comma-separated knob (`100,500,1000`); `default` is spelled the same way. Empty items are
/// left out.
pub fn list<T>(name: &str, default: &str) -> Result<Vec<T>>
where
    T: FromStr,
    T::Err: Display,
{
    let text = std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    parse_list(name, text.as_deref().unwrap_or(default))
}

fn parse<T>(name: &str, value: Option<&str>) -> Result<Option<T>>
where
    T: FromStr,
    T::Err: Display,
{
    match value.map(str::trim).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|e| anyhow!("{name}={v:?} is not a valid {}: {e}", type_name::<T>())),
    }
}

fn parse_list<T>(name: &str, text: &str) -> Result<Vec<T>>
where
    T: FromStr,
    T::Err: Display,
{
    text.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| {
            item.parse().map_err(|e| {
                anyhow!(
                    "{name}: item {item:?} is not a valid {}: {e}",
                    type_name::<T>()
                )
            })
        })
        .collect()
}

/// `u64` rather than `core::primitive::u64`, `String` rather than `alloc::string::String`.
fn type_name<T>() -> &'static str {
    let full = std::any::type_name::<T>();
    full.rsplit("::").next().unwrap_or(full)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_and_blank_take_the_default_values_are_trimmed() {
        assert_eq!(parse::<u64>("N", None).unwrap(), None);
        assert_eq!(parse::<u64>("N", Some("  ")).unwrap(), None);
        assert_eq!(parse::<u64>("N", Some(" 42 ")).unwrap(), Some(42));
        assert_eq!(parse::<f64>("N", Some("2.5")).unwrap(), Some(2.5));
    }

    #[test]
    fn a_bad_value_is_an_error_naming_the_knob_and_the_value() {
        let error = parse::<u16>("CHATOP_BENCH_X", Some("lots"))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("CHATOP_BENCH_X") && error.contains("\"lots\"") && error.contains("u16"),
            "{error}"
        );
        assert!(parse::<u16>("N", Some("70000")).is_err());
    }

    #[test]
    fn lists_split_on_commas_and_reject_a_bad_item() {
        assert_eq!(
            parse_list::<f64>("R", "100, 500,,1000").unwrap(),
            [100.0, 500.0, 1000.0]
        );
        assert_eq!(
            parse_list::<String>("O", "memory,latency").unwrap(),
            ["memory", "latency"]
        );
        let error = parse_list::<f64>("R", "100,fast").unwrap_err().to_string();
        assert!(error.contains("\"fast\""), "{error}");
    }
}
