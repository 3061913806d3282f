//! Kubernetes resource quantities in the API server's canonical form.
//!
//! The server stores `cpu: "0.5"` as `500m` and `1024Mi` as `1Gi`; a
//! desired object that keeps the user's spelling never equals the live one
//! and would be re-applied on every pass. So desired quantities are written
//! the way the server would write them back, following apimachinery's
//! `Quantity.CanonicalizeBytes`: the suffix family (decimal SI, binary SI,
//! exponent) is kept, except that binary values below 1024 or with a
//! fraction become decimal; precision is nano, rounded up.

use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    DecimalSi,
    BinarySi,
    Exponent,
}

/// A parsed quantity: `mantissa × 10^exp`, in the given suffix family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Parsed {
    negative: bool,
    mantissa: u128,
    exp: i32,
    format: Format,
}

const DECIMAL: [(&str, i32); 9] = [
    ("n", -9),
    ("u", -6),
    ("m", -3),
    ("k", 3),
    ("M", 6),
    ("G", 9),
    ("T", 12),
    ("P", 15),
    ("E", 18),
];
const BINARY: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];

fn parse(s: &str) -> Option<Parsed> {
    let s = s.trim();
    let (negative, rest) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    let num_len = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    let (num, suffix) = rest.split_at(num_len);
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if int.is_empty() && frac.is_empty() || frac.contains('.') {
        return None;
    }
    let digits = format!("{int}{frac}");
    if digits.len() > 30 {
        return None;
    }
    let mut mantissa: u128 = if digits.is_empty() {
        0
    } else {
        digits.parse().ok()?
    };
    let mut exp = -(frac.len() as i32);
    let format = if suffix.is_empty() {
        Format::DecimalSi
    } else if let Some(&(_, e)) = DECIMAL.iter().find(|(x, _)| *x == suffix) {
        exp += e;
        Format::DecimalSi
    } else if let Some(i) = BINARY.iter().position(|x| !x.is_empty() && *x == suffix) {
        mantissa = mantissa.checked_mul(1u128 << (10 * i))?;
        Format::BinarySi
    } else if let Some(e) = suffix.strip_prefix(['e', 'E']) {
        exp += e.parse::<i32>().ok().filter(|e| e.abs() <= 30)?;
        Format::Exponent
    } else {
        return None;
    };
    Some(Parsed {
        negative,
        mantissa,
        exp,
        format,
    })
}

/// Whether `s` is a quantity the API server accepts.
pub fn is_valid(s: &str) -> bool {
    parse(s).is_some()
}

/// `s` as the API server writes it back, or `None` if it is no quantity.
pub fn canonical(s: &str) -> Option<String> {
    let mut q = parse(s)?;
    // Nano precision, rounded up (away from zero), as the server does.
    if q.exp < -9 {
        let div = 10u128.checked_pow((-9 - q.exp) as u32)?;
        q.mantissa = q.mantissa.div_ceil(div);
        q.exp = -9;
    }
    if q.mantissa == 0 {
        return Some("0".into());
    }
    let sign = if q.negative { "-" } else { "" };
    let mut format = q.format;
    if format == Format::BinarySi {
        // Binary SI only for whole numbers of at least 1024.
        let whole = if q.exp >= 0 {
            q.mantissa.checked_mul(10u128.checked_pow(q.exp as u32)?)
        } else {
            let div = 10u128.pow((-q.exp) as u32);
            (q.mantissa % div == 0).then(|| q.mantissa / div)
        };
        match whole {
            Some(mut v) if v >= 1024 => {
                let mut i = 0;
                while i < BINARY.len() - 1 && v % 1024 == 0 {
                    v /= 1024;
                    i += 1;
                }
                return Some(format!("{sign}{v}{}", BINARY[i]));
            }
            _ => format = Format::DecimalSi,
        }
    }
    let (mut m, mut e) = (q.mantissa, q.exp);
    while m % 10 == 0 {
        m /= 10;
        e += 1;
    }
    match e.rem_euclid(3) {
        1 => {
            m = m.checked_mul(10)?;
            e -= 1;
        }
        2 => {
            m = m.checked_mul(100)?;
            e -= 2;
        }
        _ => {}
    }
    let suffix = match format {
        Format::Exponent if e == 0 => String::new(),
        Format::Exponent => format!("e{e}"),
        _ if e == 0 => String::new(),
        _ => DECIMAL.iter().find(|(_, x)| *x == e)?.0.to_owned(),
    };
    Some(format!("{sign}{m}{suffix}"))
}

/// Rewrites every quantity of `resources.{limits,requests}` of every
/// container under `value` into the canonical form (others untouched).
pub fn normalise_resources(value: &mut Value) {
    match value {
        Value::Object(o) => {
            for (k, v) in o.iter_mut() {
                if k == "resources" {
                    for part in ["limits", "requests"] {
                        if let Some(Value::Object(q)) = v.get_mut(part) {
                            for amount in q.values_mut() {
                                let text = match amount {
                                    Value::String(s) => s.clone(),
                                    Value::Number(n) => n.to_string(),
                                    _ => continue,
                                };
                                if let Some(c) = canonical(&text) {
                                    *amount = Value::String(c);
                                }
                            }
                        }
                    }
                } else {
                    normalise_resources(v);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(normalise_resources),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_forms_match_the_api_server() {
        for (input, want) in [
            ("0.5", "500m"),
            ("1024Mi", "1Gi"),
            ("1.5Gi", "1536Mi"),
            ("0.5Gi", "512Mi"),
            ("0.5Ki", "512"),
            ("1000Mi", "1000Mi"),
            ("1Ki", "1Ki"),
            ("1000m", "1"),
            ("1500m", "1500m"),
            ("1.5", "1500m"),
            ("2000", "2k"),
            ("100", "100"),
            ("250m", "250m"),
            ("1G", "1G"),
            ("1000M", "1G"),
            ("128974848", "128974848"),
            ("129e6", "129e6"),
            ("1e3", "1e3"),
            ("0", "0"),
            ("0.0000000001", "1n"),
            ("100Mi", "100Mi"),
            ("2", "2"),
        ] {
            assert_eq!(canonical(input).as_deref(), Some(want), "{input}");
        }
    }

    #[test]
    fn rejects_what_is_not_a_quantity() {
        for bad in ["", "abc", "1.2.3", "1Qi", "Mi", "1 Gi", "."] {
            assert!(!is_valid(bad), "{bad:?}");
        }
        assert!(is_valid("500m") && is_valid(".5") && is_valid("1e3"));
    }

    #[test]
    fn normalises_container_resources_in_place() {
        let mut d = serde_json::json!({"spec": {"template": {"spec": {"containers": [
            {"name": "a", "resources": {"limits": {"cpu": "0.5", "memory": "1024Mi"}, "requests": {"cpu": 1}}}
        ]}}}});
        normalise_resources(&mut d);
        let r = &d["spec"]["template"]["spec"]["containers"][0]["resources"];
        assert_eq!(r["limits"]["cpu"], "500m");
        assert_eq!(r["limits"]["memory"], "1Gi");
        assert_eq!(r["requests"]["cpu"], "1");
    }
}
