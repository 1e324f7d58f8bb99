//! Reading Kubernetes resource quantities (`500m`, `1.5Gi`, `2e3`) the way the API server does,
//! so that a spec with `storage: lots` or a request above its limit is refused before any child
//! is applied, instead of failing half-way on the first StatefulSet or Deployment.
//!
//! The schema cannot do this cheaply: quantities are int-or-string values inside maps, for which
//! the API server's CEL cost estimate exceeds its budget.

/// The value of a quantity as a float (enough to compare two quantities), or why it is not one.
pub fn parse_quantity(text: &str) -> Result<f64, String> {
    let invalid = || {
        format!(
            "{text:?} is not a quantity (a number with an optional suffix such as m, Ki, Mi, Gi, k, M, G or an exponent)"
        )
    };
    let unsigned = text.strip_prefix(['+', '-']).unwrap_or(text);
    let sign = if text.starts_with('-') { -1.0 } else { 1.0 };
    let number_end = unsigned
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(unsigned.len());
    let (number, suffix) = unsigned.split_at(number_end);
    let digits = number.chars().filter(char::is_ascii_digit).count();
    if digits == 0 || number.matches('.').count() > 1 {
        return Err(invalid());
    }
    let value: f64 = number.parse().map_err(|_| invalid())?;
    let scale = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exponent if exponent.starts_with(['e', 'E']) => {
            let power: i32 = exponent[1..].parse().map_err(|_| invalid())?;
            10f64.powi(power)
        }
        _ => return Err(invalid()),
    };
    Ok(sign * value * scale)
}

#[cfg(test)]
mod tests {
    use super::parse_quantity;

    #[test]
    fn the_api_servers_forms_are_read() {
        assert_eq!(parse_quantity("500m"), Ok(0.5));
        assert_eq!(parse_quantity("2"), Ok(2.0));
        assert_eq!(parse_quantity("1.5Gi"), Ok(1.5 * 1024f64.powi(3)));
        assert_eq!(parse_quantity("128Mi"), Ok(128.0 * 1024f64.powi(2)));
        assert_eq!(parse_quantity("2e3"), Ok(2000.0));
        assert_eq!(parse_quantity("-5Gi"), Ok(-5.0 * 1024f64.powi(3)));
        assert_eq!(parse_quantity(".5"), Ok(0.5));
    }

    #[test]
    fn anything_else_is_refused_with_the_text() {
        for bad in ["abc", "lots", "", "5GB", "1.2.3", "Gi", "-", "1e", "5 Gi"] {
            let error = parse_quantity(bad).expect_err(bad);
            assert!(error.contains(&format!("{bad:?}")), "{error}");
        }
    }
}
