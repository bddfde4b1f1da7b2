//! Several `--url`s: how a user moves to the next when its balancer is gone, and how a move is
//! judged.
//!
//! User `i` starts on URL `i % n`. A user whose balancer refuses the connection or resets it
//! moves to the next URL, as a browser with several A records does: a refused connection is
//! tried again at once on the next URL (the request never reached anyone), a reset is an error
//! (the request was in flight) and the user's next request goes to the next URL. A move is
//! judged by the user's first answer after it: the same node as its last answer before the move
//! means the balancer it moved to honoured its sticky cookie. The report's side of it
//! (`Failover`, `BalancerCount`) is in `report.rs`.

/// One user's moves and how the first answer after each was judged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Moves {
    moves: u64,
    /// The node of the user's last answer before a move not yet judged.
    pending: Option<String>,
    kept: u64,
    changed: u64,
}

impl Moves {
    /// The user moved; `last_node` answered it last (`None`: nothing answered it yet).
    pub(super) fn moved(&mut self, last_node: Option<&str>) {
        self.moves += 1;
        // Two moves before an answer are judged against the node before the first.
        if self.pending.is_none() {
            self.pending = last_node.map(str::to_owned);
        }
    }

    /// An answer from `node`: judges the move before it, if any.
    pub(super) fn answered(&mut self, node: &str) {
        if let Some(before) = self.pending.take() {
            if before == node {
                self.kept += 1;
            } else {
                self.changed += 1;
            }
        }
    }
}

impl Moves {
    /// Times the user moved.
    pub(super) fn moves(&self) -> u64 {
        self.moves
    }

    /// Judged moves: (kept the node, changed it).
    pub(super) fn judged(&self) -> (u64, u64) {
        (self.kept, self.changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_move_is_judged_by_the_next_answer() {
        let mut m = Moves::default();
        m.answered("web-1");
        m.moved(Some("web-1"));
        m.moved(Some("web-1"));
        m.answered("web-1");
        m.answered("web-2");
        m.moved(Some("web-2"));
        m.answered("web-1");
        assert_eq!((m.moves(), m.judged()), (3, (1, 1)));
        // A move before any answer has nothing to compare with.
        let mut fresh = Moves::default();
        fresh.moved(None);
        fresh.answered("web-1");
        assert_eq!((fresh.moves(), fresh.judged()), (1, (0, 0)));
    }
}
