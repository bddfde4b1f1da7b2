//! How evenly the answers were spread over the nodes that gave them.
//!
//! Only answers that named a node (`x-served-by`) count: a balancer's own answers belong to no
//! backend. A node that answered nothing at all is invisible from the client side, so it shows
//! as missing from `shares`, not as a zero.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::round::round;

/// Per-node shares and two evenness figures; see the README's `fulcrum load` section.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Distribution {
    /// Each node's fraction of the answers that named a node, to four decimals.
    pub shares: BTreeMap<String, f64>,
    /// Coefficient of variation of the per-node answer counts: population standard deviation
    /// over the mean, to four decimals. 0 is perfectly even; `null` without answers.
    pub cv: Option<f64>,
    /// The most-served node's count over the least-served one's, to four decimals. 1 is
    /// perfectly even; `null` without answers.
    pub max_min_ratio: Option<f64>,
}

impl Distribution {
    /// From answers per node, leaving out the names in `skip`.
    pub(super) fn from_counts(counts: &BTreeMap<String, u64>, skip: &str) -> Self {
        let nodes: Vec<(&String, u64)> = counts
            .iter()
            .filter(|(name, n)| name.as_str() != skip && **n > 0)
            .map(|(name, n)| (name, *n))
            .collect();
        let total: u64 = nodes.iter().map(|(_, n)| n).sum();
        if nodes.is_empty() {
            return Distribution::default();
        }
        let shares = nodes
            .iter()
            .map(|(name, n)| ((*name).clone(), round(*n as f64 / total as f64, 4)))
            .collect();
        let values: Vec<f64> = nodes.iter().map(|(_, n)| *n as f64).collect();
        let mean = total as f64 / values.len() as f64;
        let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / values.len() as f64;
        let (min, max) = values.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
            (lo.min(*v), hi.max(*v))
        });
        Distribution {
            shares,
            cv: Some(round(variance.sqrt() / mean, 4)),
            // Every count here is at least 1, so min is never 0.
            max_min_ratio: Some(round(max / min, 4)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
    }

    #[test]
    fn an_even_spread_has_cv_0_and_ratio_1() {
        let d = Distribution::from_counts(&counts(&[("a", 100), ("b", 100), ("c", 100)]), "-");
        assert_eq!(d.cv, Some(0.0));
        assert_eq!(d.max_min_ratio, Some(1.0));
        assert_eq!(d.shares["a"], 0.3333);
        assert_eq!(d.shares.len(), 3);
    }

    #[test]
    fn cv_is_population_stddev_over_mean() {
        // Mean 20, deviations -10, 0, +10: variance 200/3, stddev 8.165, cv 0.4082.
        let d = Distribution::from_counts(&counts(&[("a", 10), ("b", 20), ("c", 30)]), "-");
        assert_eq!(d.cv, Some(0.4082));
        assert_eq!(d.max_min_ratio, Some(3.0));
        assert_eq!(d.shares["a"], 0.1667);
        assert_eq!(d.shares["c"], 0.5);
        // Two nodes 1:3: mean 2, stddev 1, cv 0.5.
        let d = Distribution::from_counts(&counts(&[("a", 1), ("b", 3)]), "-");
        assert_eq!((d.cv, d.max_min_ratio), (Some(0.5), Some(3.0)));
    }

    #[test]
    fn answers_without_a_node_are_left_out() {
        let d = Distribution::from_counts(&counts(&[("web-1", 50), ("(none)", 900)]), "(none)");
        assert_eq!(d.shares, BTreeMap::from([("web-1".to_owned(), 1.0)]));
        assert_eq!((d.cv, d.max_min_ratio), (Some(0.0), Some(1.0)));
        let none = Distribution::from_counts(&counts(&[("(none)", 3)]), "(none)");
        assert_eq!(none, Distribution::default());
        assert_eq!((none.cv, none.max_min_ratio), (None, None));
    }
}
