//! Several `--url`s: what each balancer answered, and how users fared when one went away.
//!
//! User `i` starts on URL `i % n`. A user whose balancer refuses the connection or resets it
//! moves to the next URL, as a browser with several A records does: a refused connection is
//! tried again at once on the next URL (the request never reached anyone), a reset is an error
//! (the request was in flight) and the user's next request goes to the next URL. A move is
//! judged by the user's first answer after it: the same node as its last answer before the move
//! means the balancer it moved to honoured its sticky cookie.

use serde::{Deserialize, Serialize};

use super::report::{ErrorCounts, ErrorKind};
use super::round::round;

/// Per balancer counts and user moves; present in a report only with several `--url`s.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Failover {
    /// One entry per `--url`, in the order given.
    pub balancers: Vec<BalancerCount>,
    /// Times a user moved to the next URL because its balancer was gone.
    pub moves: u64,
    /// Users that moved at least once.
    pub users_moved: usize,
    /// Moves after which the user's next answer came from the node it had before the move.
    pub kept_node: u64,
    /// Moves after which the user's next answer came from another node (or none).
    pub changed_node: u64,
    /// `kept_node / (kept_node + changed_node)`, to four decimals; `null` when no moved user
    /// was answered on both sides of its move.
    pub sticky_kept: Option<f64>,
}

/// What one `--url` saw.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BalancerCount {
    /// The `--url`.
    pub url: String,
    /// Users that started on this URL.
    pub users_started: usize,
    /// Requests that finished here: answered (any status) or failed.
    pub requests: u64,
    /// Answers (any status).
    pub responses: u64,
    /// Failed requests by kind; 5xx answers included.
    pub errors: ErrorCounts,
    /// Users that moved away from this URL.
    pub moves_away: u64,
}

impl BalancerCount {
    pub(super) fn answer(&mut self, status: u16) {
        self.responses += 1;
        self.requests += 1;
        if status >= 500 {
            self.errors.add(ErrorKind::Status);
        }
    }

    pub(super) fn error(&mut self, kind: ErrorKind) {
        self.requests += 1;
        self.errors.add(kind);
    }
}

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

impl Failover {
    /// Adds one user's moves.
    pub(super) fn add_user(&mut self, moves: &Moves) {
        self.moves += moves.moves;
        self.users_moved += usize::from(moves.moves > 0);
        self.kept_node += moves.kept;
        self.changed_node += moves.changed;
        let judged = self.kept_node + self.changed_node;
        self.sticky_kept = (judged > 0).then(|| round(self.kept_node as f64 / judged as f64, 4));
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
        // A move before any answer has nothing to compare with.
        let mut fresh = Moves::default();
        fresh.moved(None);
        fresh.answered("web-1");

        let mut f = Failover::default();
        f.add_user(&m);
        f.add_user(&fresh);
        f.add_user(&Moves::default());
        assert_eq!(
            (f.moves, f.users_moved, f.kept_node, f.changed_node),
            (4, 2, 1, 1)
        );
        assert_eq!(f.sticky_kept, Some(0.5));
    }
}
