//! The one rounding rule for the report's figures.

/// `value` to `decimals` places: people and scripts read these figures, and neither wants the
/// noise of float division (`0.30000000000000004`).
pub(super) fn round(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_lose_the_noise_of_float_division() {
        assert_eq!(round(0.1 + 0.2, 2), 0.3);
        assert_eq!(round(2.0 / 3.0, 4), 0.6667);
        assert_eq!(round(1003.0 / 4.004, 2), 250.5);
        // Four places is the scale of 1e4: the same figure as `(v * 1e4).round() / 1e4`.
        assert_eq!(10f64.powi(4), 1e4);
    }
}
