//! Walking an error's source chain: the one place that does it, for log lines and for finding
//! what caused a failure.

/// The error type hyper and tonic bodies carry.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An error and each of its sources in turn, outermost first.
pub(crate) fn chain<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(error), |e| e.source())
}

/// The innermost source: what the operating system or the peer actually said.
pub(crate) fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    chain(error)
        .last()
        .map_or_else(String::new, ToString::to_string)
}

/// Formats an error with its whole source chain, `outer: inner: root`.
pub(crate) struct ErrorChain<'a>(pub &'a dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn the_chain_runs_from_outer_to_root() {
        let error = Outer(std::io::Error::other("root"));
        assert_eq!(ErrorChain(&error).to_string(), "outer: root");
        assert_eq!(root_cause(&error), "root");
        assert_eq!(chain(&error).count(), 2);
    }
}
