//! [`PlacerKind`]: choosing a policy by name (the lb-agent's `FN_PLACER=naive|ch|warm`).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use crate::{ConsistentHashPlacer, DEFAULT_EPSILON, NaivePlacer, Placer, WarmPlacer};

/// The placement policies, by the names operators configure them with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PlacerKind {
    /// Round-robin, `naive`: see [`NaivePlacer`].
    Naive,
    /// Consistent hashing on the function's identity, `ch`: see [`ConsistentHashPlacer`].
    ConsistentHash,
    /// The `ch` ring reordered by the runners' reports, `warm`: see [`WarmPlacer`].
    Warm,
}

impl PlacerKind {
    /// Every kind, in the order they are listed in messages.
    pub const ALL: [PlacerKind; 3] = [
        PlacerKind::Naive,
        PlacerKind::ConsistentHash,
        PlacerKind::Warm,
    ];

    /// The configuration name: `naive`, `ch` or `warm`. Also the built placer's
    /// [`Placer::name`].
    pub fn as_str(self) -> &'static str {
        match self {
            PlacerKind::Naive => "naive",
            PlacerKind::ConsistentHash => "ch",
            PlacerKind::Warm => "warm",
        }
    }

    /// A fresh placer of this kind, ready to be shared by all calls of an LB (`warm` with
    /// [`DEFAULT_EPSILON`]).
    pub fn build(self) -> Arc<dyn Placer> {
        self.build_with_epsilon(DEFAULT_EPSILON)
    }

    /// Like [`PlacerKind::build`], with the bounded-load `epsilon` of the `warm` placer (the
    /// others have none).
    pub fn build_with_epsilon(self, epsilon: f64) -> Arc<dyn Placer> {
        match self {
            PlacerKind::Naive => Arc::new(NaivePlacer::new()),
            PlacerKind::ConsistentHash => Arc::new(ConsistentHashPlacer::new()),
            PlacerKind::Warm => Arc::new(WarmPlacer::new(epsilon)),
        }
    }
}

impl fmt::Display for PlacerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PlacerKind {
    type Err = UnknownPlacer;

    /// Parses the exact names `naive`, `ch` and `warm`.
    ///
    /// # Errors
    ///
    /// [`UnknownPlacer`] for any other string; its message lists the valid names.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.as_str() == s)
            .ok_or_else(|| UnknownPlacer(s.to_owned()))
    }
}

/// A placer name that is not one of [`PlacerKind`]'s. A configuration error: the operator must
/// fix the value, retrying cannot help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown placer {0:?}: expected one of {valid}", valid = valid_names())]
pub struct UnknownPlacer(
    /// The rejected name, as given.
    pub String,
);

/// The valid names, quoted and comma-separated: `"naive", "ch", "warm"`.
fn valid_names() -> String {
    PlacerKind::ALL
        .map(|kind| format!("{:?}", kind.as_str()))
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_configured_names() -> Result<(), UnknownPlacer> {
        assert_eq!("naive".parse::<PlacerKind>()?, PlacerKind::Naive);
        assert_eq!("ch".parse::<PlacerKind>()?, PlacerKind::ConsistentHash);
        assert_eq!("warm".parse::<PlacerKind>()?, PlacerKind::Warm);
        Ok(())
    }

    #[test]
    fn names_round_trip_and_match_the_built_placer() -> Result<(), UnknownPlacer> {
        for kind in PlacerKind::ALL {
            assert_eq!(kind.to_string().parse::<PlacerKind>()?, kind);
            assert_eq!(kind.build().name(), kind.as_str());
        }
        Ok(())
    }

    #[test]
    fn rejects_other_names_listing_the_valid_ones() {
        for bad in ["", "CH", "Naive", "consistent-hash", " ch", "random"] {
            let Err(err) = bad.parse::<PlacerKind>() else {
                panic!("{bad:?} must be rejected");
            };
            assert_eq!(err, UnknownPlacer(bad.to_owned()));
            let message = err.to_string();
            assert!(
                message.contains("\"naive\"") && message.contains("\"ch\""),
                "{message}"
            );
        }
    }
}
