//! Value parsers of the numeric options: every number is checked where it enters, and clap's
//! error names the option ("invalid value '0' for '--batch <BATCH>': must be at least 1").

/// A count of at least one (iterations, batch size, patch, tile, features, …).
pub fn at_least_one(text: &str) -> Result<usize, String> {
    let n: usize = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a whole number"))?;
    if n == 0 {
        return Err("must be at least 1".into());
    }
    Ok(n)
}

/// A finite number above zero (learning rate, σ).
pub fn positive(text: &str) -> Result<f64, String> {
    let v = finite(text)?;
    if v <= 0.0 {
        return Err("must be above zero".into());
    }
    Ok(v)
}

/// A finite number (NaN and ±inf are refused).
pub fn finite(text: &str) -> Result<f64, String> {
    let v: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    if !v.is_finite() {
        return Err("must be a finite number".into());
    }
    Ok(v)
}

/// A finite f32 threshold.
pub fn threshold(text: &str) -> Result<f32, String> {
    let v = finite(text)?;
    if v.abs() > f64::from(f32::MAX) {
        return Err("out of range".into());
    }
    Ok(v as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_outside_their_domain_are_refused() {
        assert_eq!(at_least_one("3"), Ok(3));
        assert!(at_least_one("0").unwrap_err().contains("at least 1"));
        assert!(at_least_one("-1").is_err());
        assert!(at_least_one("2.5").is_err());
        assert_eq!(positive("1e-4"), Ok(1e-4));
        for bad in ["-1", "0", "NaN", "inf", "-inf", "x"] {
            assert!(positive(bad).is_err(), "{bad}");
        }
        assert_eq!(threshold("-0.5"), Ok(-0.5));
        for bad in ["NaN", "nan", "inf", "1e300"] {
            assert!(threshold(bad).is_err(), "{bad}");
        }
    }
}
