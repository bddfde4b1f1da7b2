//! Session continuity: did each user's visit count go on, or start over?
//!
//! A web node's `/session` answers carry `x-session-visits: N`. A user keeps continuity when
//! every count it is shown continues the one before: the first is 1 and each next is the
//! previous plus one. A count that does not continue (a memory node that never saw the session,
//! an expired session) is a reset.
//!
//! Requests that got no count (a transport error, a timeout, a balancer's own 503 without the
//! header) are not resets themselves, but the server may or may not have counted them before
//! the answer was lost; so after `k` of them the next count may be anything from previous + 1
//! to previous + 1 + k. Anything outside that window is a reset.

use serde::{Deserialize, Serialize};

use super::round::round;

/// One user's view of its session count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Continuity {
    /// The last count shown, `None` before the first.
    last: Option<u64>,
    /// Requests since `last` that ended without a count.
    uncounted: u64,
    resets: u64,
}

impl Continuity {
    /// An answer that said the session has now been visited `visits` times.
    pub(super) fn counted(&mut self, visits: u64) {
        let low = self.last.map_or(1, |last| last.saturating_add(1));
        let high = low.saturating_add(self.uncounted);
        if !(low..=high).contains(&visits) {
            self.resets += 1;
        }
        self.last = Some(visits);
        self.uncounted = 0;
    }

    /// A request that ended without a count.
    pub(super) fn uncounted(&mut self) {
        self.uncounted = self.uncounted.saturating_add(1);
    }

    /// Whether any answer carried a count, so continuity means something for this user.
    pub(super) fn tracked(&self) -> bool {
        self.last.is_some()
    }

    pub(super) fn resets(&self) -> u64 {
        self.resets
    }
}

/// How users fared across a run: node switches (from `x-served-by`) and count resets (from
/// `x-session-visits`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Sessions {
    /// Answers from a different node than the same user's previous answer.
    pub switches: u64,
    /// Users that saw at least one switch.
    pub users_switched: usize,
    /// Users that got at least one answer with `x-session-visits` (continuity is over these).
    pub users_tracked: usize,
    /// Tracked users whose count reset at least once.
    pub users_reset: usize,
    /// Counts that did not continue the previous one, over all users.
    pub resets: u64,
    /// Fraction of tracked users that never saw a reset, to four decimals; `null` when no
    /// answer carried a count (the path was not `/session`).
    pub continuity: Option<f64>,
}

impl Sessions {
    /// Adds one user: its node switches and its count history.
    pub(super) fn add_user(&mut self, switches: u64, continuity: &Continuity) {
        self.switches += switches;
        self.users_switched += usize::from(switches > 0);
        if continuity.tracked() {
            self.users_tracked += 1;
            self.users_reset += usize::from(continuity.resets() > 0);
            self.resets += continuity.resets();
        }
        self.continuity = (self.users_tracked > 0).then(|| {
            let kept = (self.users_tracked - self.users_reset) as f64;
            round(kept / self.users_tracked as f64, 4)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(events: &[Option<u64>]) -> Continuity {
        let mut c = Continuity::default();
        for event in events {
            match event {
                Some(visits) => c.counted(*visits),
                None => c.uncounted(),
            }
        }
        c
    }

    #[test]
    fn counting_on_by_one_from_one_is_continuity() {
        let c = run(&[Some(1), Some(2), Some(3), Some(4)]);
        assert_eq!((c.tracked(), c.resets()), (true, 0));
    }

    #[test]
    fn starting_over_or_not_starting_at_one_is_a_reset() {
        // Round robin over memory nodes: every move starts a new session.
        assert_eq!(run(&[Some(1), Some(1), Some(1)]).resets(), 2);
        assert_eq!(run(&[Some(1), Some(2), Some(1), Some(2)]).resets(), 1);
        // Going backwards, skipping ahead with nothing lost, or a first count above 1.
        assert_eq!(run(&[Some(1), Some(2), Some(3), Some(2)]).resets(), 1);
        assert_eq!(run(&[Some(1), Some(3)]).resets(), 1);
        assert_eq!(run(&[Some(5)]).resets(), 1);
    }

    #[test]
    fn lost_answers_are_not_resets_and_widen_the_window() {
        // The server counted visit 2 but the answer was lost: 3 continues.
        assert_eq!(run(&[Some(1), None, Some(3)]).resets(), 0);
        // Or it never got there: 2 continues too.
        assert_eq!(run(&[Some(1), None, Some(2)]).resets(), 0);
        // Two lost: up to previous + 3, not further, and a restart at 1 is still a reset.
        assert_eq!(run(&[Some(1), None, None, Some(4)]).resets(), 0);
        assert_eq!(run(&[Some(1), None, None, Some(5)]).resets(), 1);
        assert_eq!(run(&[Some(4), None, Some(1)]).resets(), 2);
        // Failures before any count: the first count may be up to 1 + failures.
        assert_eq!(run(&[None, None, Some(1)]).resets(), 0);
        assert_eq!(run(&[None, Some(2), Some(3)]).resets(), 0);
        // The window closes again after a count.
        assert_eq!(run(&[Some(1), None, Some(2), Some(4)]).resets(), 1);
        // Only failures: nothing to judge.
        assert!(!run(&[None, None]).tracked());
    }

    #[test]
    fn continuity_is_the_fraction_of_tracked_users_never_reset() {
        let mut s = Sessions::default();
        assert_eq!(s.continuity, None);
        s.add_user(0, &run(&[Some(1), Some(2), Some(3)]));
        s.add_user(2, &run(&[Some(1), Some(1), Some(1)]));
        s.add_user(1, &run(&[Some(1), Some(2), Some(3)]));
        // Untracked users (no count at all) do not count either way.
        s.add_user(0, &run(&[None]));
        assert_eq!(
            s,
            Sessions {
                switches: 3,
                users_switched: 2,
                users_tracked: 3,
                users_reset: 1,
                resets: 2,
                continuity: Some(0.6667),
            }
        );
    }
}
