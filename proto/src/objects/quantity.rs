//! Kubernetes resource quantities: `500m`, `2`, `0.5` for cpu; `128Mi`, `1G`, `1e9` for
//! memory. A [`Quantity`] keeps the text the user wrote (so a manifest round-trips) and is
//! parsed when it is used; [`Quantity::milli_value`] and [`Quantity::value`] give the
//! numbers, rounded up as Kubernetes rounds (a request of `0.5m` cpu is 1 milli-cpu).

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A resource amount as written in a manifest.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Quantity(pub String);

/// Why a quantity does not parse; the message names the text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid quantity {0:?}")]
pub struct InvalidQuantity(pub String);

/// The largest amount Capstan accounts for, in thousandths: far beyond any machine, and
/// small enough that sums of many requests cannot overflow an `i128` or even an `i64`.
const MILLI_VALUE_MAX: i128 = 1 << 62;

impl Quantity {
    pub fn new(text: impl Into<String>) -> Self {
        Self(text.into())
    }

    /// The amount in thousandths of a unit (milli-cpu for cpu), rounded up.
    pub fn milli_value(&self) -> Result<i64, InvalidQuantity> {
        let invalid = || InvalidQuantity(self.0.clone());
        let (mantissa, scale) = split(self.0.trim()).ok_or_else(invalid)?;
        let (digits, fraction_digits) = parse_decimal(mantissa).ok_or_else(invalid)?;
        // value = digits * 10^-fraction_digits * scale; in thousandths that is
        // digits * scale.numerator * 1000 / (10^fraction_digits * scale.denominator).
        let numerator = digits.checked_mul(scale.numerator).and_then(|n| n.checked_mul(1000)).ok_or_else(invalid)?;
        let denominator =
            10i128.checked_pow(fraction_digits).and_then(|d| d.checked_mul(scale.denominator)).ok_or_else(invalid)?;
        let milli = (numerator + denominator - 1) / denominator;
        if milli > MILLI_VALUE_MAX {
            return Err(invalid());
        }
        Ok(milli as i64)
    }

    /// The amount in whole units (bytes for memory), rounded up.
    pub fn value(&self) -> Result<i64, InvalidQuantity> {
        Ok((self.milli_value()? + 999) / 1000)
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A scale factor as a fraction, so `m` (1/1000) stays exact.
struct Scale {
    numerator: i128,
    denominator: i128,
}

/// Splits `"128Mi"` into `("128", 2^20)` and `"1e3"` into `("1", 1000)`.
fn split(text: &str) -> Option<(&str, Scale)> {
    let power = |base: i128, exp: u32| Scale { numerator: base.pow(exp), denominator: 1 };
    const BINARY: [(&str, u32); 6] = [("Ki", 10), ("Mi", 20), ("Gi", 30), ("Ti", 40), ("Pi", 50), ("Ei", 60)];
    for (suffix, exp) in BINARY {
        if let Some(mantissa) = text.strip_suffix(suffix) {
            return Some((mantissa, power(2, exp)));
        }
    }
    const DECIMAL: [(char, i32); 9] =
        [('n', -9), ('u', -6), ('m', -3), ('k', 3), ('M', 6), ('G', 9), ('T', 12), ('P', 15), ('E', 18)];
    for (suffix, exp) in DECIMAL {
        if let Some(mantissa) = text.strip_suffix(suffix) {
            let scale = if exp < 0 {
                Scale { numerator: 1, denominator: 10i128.pow(exp.unsigned_abs()) }
            } else {
                power(10, exp as u32)
            };
            return Some((mantissa, scale));
        }
    }
    // `1E` is one exa (above); `1e3` and `1E3` are exponents.
    if let Some((mantissa, exponent)) = text.split_once(['e', 'E']) {
        let exponent: i32 = exponent.parse().ok()?;
        return match exponent {
            0..=18 => Some((mantissa, power(10, exponent as u32))),
            -18..=-1 => Some((mantissa, Scale { numerator: 1, denominator: 10i128.pow(exponent.unsigned_abs()) })),
            _ => None,
        };
    }
    Some((text, power(10, 0)))
}

/// Parses a non-negative decimal (`"2"`, `"0.5"`, `"+1.25"`) into its digits as an integer
/// and the count of digits after the point.
fn parse_decimal(text: &str) -> Option<(i128, u32)> {
    let text = text.strip_prefix('+').unwrap_or(text);
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    if whole.is_empty() && fraction.is_empty() {
        return None;
    }
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(whole) || !all_digits(fraction) || whole.len() + fraction.len() > 30 {
        return None;
    }
    let digits: i128 = format!("{whole}{fraction}").parse().ok()?;
    Some((digits, fraction.len() as u32))
}

impl Serialize for Quantity {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

/// Accepts a string or a plain number, as YAML writes `cpu: 2` and `cpu: 0.5` unquoted.
impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Text {
            String(String),
            Integer(i64),
            Float(f64),
        }
        Ok(match Text::deserialize(deserializer)? {
            Text::String(text) => Quantity(text),
            Text::Integer(number) => Quantity(number.to_string()),
            Text::Float(number) => Quantity(number.to_string()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn milli(text: &str) -> Result<i64, InvalidQuantity> {
        Quantity::new(text).milli_value()
    }

    #[test]
    fn cpu_quantities_are_in_thousandths() {
        assert_eq!(milli("500m"), Ok(500));
        assert_eq!(milli("2"), Ok(2000));
        assert_eq!(milli("0.5"), Ok(500));
        assert_eq!(milli(".25"), Ok(250));
        assert_eq!(milli("1.5k"), Ok(1_500_000));
        assert_eq!(milli("0.5m"), Ok(1), "rounds up, as Kubernetes does");
        assert_eq!(milli("100n"), Ok(1));
        assert_eq!(milli("0"), Ok(0));
    }

    #[test]
    fn memory_quantities_in_bytes() {
        let bytes = |text: &str| Quantity::new(text).value();
        assert_eq!(bytes("128Mi"), Ok(128 << 20));
        assert_eq!(bytes("1G"), Ok(1_000_000_000));
        assert_eq!(bytes("1Gi"), Ok(1 << 30));
        assert_eq!(bytes("1e9"), Ok(1_000_000_000));
        assert_eq!(bytes("1.5Ki"), Ok(1536));
        assert_eq!(bytes("64"), Ok(64));
        assert_eq!(bytes("8Ei"), Err(InvalidQuantity("8Ei".into())), "beyond what Capstan accounts");
    }

    #[test]
    fn malformed_quantities_are_refused() {
        for text in ["2x", "", "m", "-1", "1..5", "1e", "Mi", "1e99", "abc", "1 Gi", "0x10", "1e-30"] {
            assert_eq!(milli(text), Err(InvalidQuantity(text.into())), "{text:?}");
        }
    }

    #[test]
    fn numbers_from_yaml_become_quantities() {
        let parsed: Vec<Quantity> = serde_json::from_str(r#"[2, 0.5, "250m"]"#).unwrap();
        assert_eq!(parsed, vec![Quantity::new("2"), Quantity::new("0.5"), Quantity::new("250m")]);
    }
}
