//! Per-backend caps: placing a request below its node's `max_connections`, and the pool's FIFO
//! queue of requests waiting for room (HAProxy's `maxconn` and its queue): a burst waits for
//! the backends instead of failing.
//!
//! A pick in a capped pool skips full nodes; the place on the chosen node is then taken with a
//! compare-and-swap on its in-flight count ([`Slot::take`]), so two racing picks cannot both
//! take the last one. A pick that loses the race picks again.
//!
//! A waiting request is an entry `(ticket, target, oneshot sender)` in a `VecDeque` under a
//! mutex. A request ending on a capped node looks at the queue's length (one atomic load) and,
//! only when someone waits, locks it, takes the node's freed place again on behalf of the first
//! entry whose target takes that node, and sends it that [`Slot`]. Why this and not tokio's
//! `Notify::notify_one`, which also wakes waiters in FIFO order:
//! - targets differ: a sticky user waits for its own node, others for any node. One `Notify`
//!   would wake whoever is first, who may be waiting for another node; its wake-up is then
//!   spent and the request that could use the place sleeps on.
//! - the place itself is handed over, not a hint to try again. A woken task runs some
//!   microseconds later, and under a burst a newly arrived request would take the place first
//!   and the waiter would go back in line: that is a lottery, not a queue.
//!
//! The mutex is touched only when a node is full (a request joins or leaves the line) or when
//! a request ends while others wait, never on the path of a pool whose nodes have room.
//!
//! A waiter that goes away (the client left, or its wait timed out) takes its entry out under
//! the lock. A place sent to it before that sits in its channel and is released when the
//! channel drops, which hands it to the next entry: a cancelled waiter never swallows a place.
//! The entries are kept in ticket order, and a waiter that must look again (the pool changed,
//! [`WaitQueue::nudge`]) re-enters at its old ticket, so it keeps its place in the line.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use metrics::Gauge;
use tokio::sync::oneshot;

use super::PoolState;
use crate::model::balance::{CappedPick, Pick};
use crate::model::node::{InFlight, Node, Waiters};

/// Looks at the nodes in a row, without waiting, when what a waiting request wants keeps
/// changing under it.
const MAX_LOOKS: u32 = 4;

/// Where [`PoolState::place`] put a request.
#[derive(Debug)]
pub enum Placement {
    /// On the node at this index, counted in flight there.
    Placed(usize, InFlight),
    /// Every node the request may use is full: [`PoolState::wait`] for room.
    Full(Wanted),
    /// No node the request may use is routable: 503.
    Nowhere,
}

/// What a request waiting in the queue waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted {
    /// Room on any node it may use.
    Any,
    /// Room on the node at this index, the one its cookie or address is bound to.
    Node(usize),
}

/// Why [`PoolState::wait`] found no room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unplaced {
    /// Every node the request could use went away while it waited.
    Nowhere,
    /// `queue_timeout` passed.
    QueueTimeout,
}

impl PoolState {
    /// Picks a node for `pick`'s request and counts the request in flight there, without
    /// waiting. In a pool without caps this is [`PoolState::pick_for`] and nothing more.
    pub fn place(&self, pick: &Pick<'_>, started: Instant) -> Placement {
        if !self.capped {
            return match self.pick_for(pick) {
                Some(index) => {
                    let node = self.backends[index].node.clone();
                    Placement::Placed(index, InFlight::start(node, started))
                }
                None => Placement::Nowhere,
            };
        }
        match self.reserve(pick) {
            Ok((index, slot)) => {
                Placement::Placed(index, InFlight::reserved(slot.into_node(), started))
            }
            Err(Some(wanted)) => Placement::Full(wanted),
            Err(None) => Placement::Nowhere,
        }
    }

    /// A capped pick and its reservation; `Err(None)` when no node is routable.
    fn reserve(&self, pick: &Pick<'_>) -> Result<(usize, Slot), Option<Wanted>> {
        // Another request can take a node's last place between this pick's look and its
        // reservation; the next pick then sees that node full. Bounded, so that a burst of
        // such races ends in the queue rather than in a spin.
        for _ in 0..=self.backends.len() {
            match self.balancer.pick_capped(&self.backends, pick) {
                CappedPick::Free(index) => {
                    if let Some(slot) = Slot::take(&self.backends[index].node) {
                        return Ok((index, slot));
                    }
                }
                CappedPick::Bound(index) => {
                    return Slot::take(&self.backends[index].node)
                        .map(|slot| (index, slot))
                        .ok_or(Some(Wanted::Node(index)));
                }
                CappedPick::AllFull => return Err(Some(Wanted::Any)),
                CappedPick::Nowhere => return Err(None),
            }
        }
        Err(Some(Wanted::Any))
    }

    /// Waits in the pool's FIFO queue, for up to `queue_timeout`, until a node `pick`'s request
    /// may use has room, and counts the request in flight there.
    pub async fn wait(
        self: &Arc<Self>,
        pick: &Pick<'_>,
        wanted: Wanted,
        started: Instant,
    ) -> Result<(usize, InFlight), Unplaced> {
        if self.settings.queue_timeout.is_zero() {
            return Err(Unplaced::QueueTimeout);
        }
        let deadline = tokio::time::Instant::now() + self.settings.queue_timeout;
        let mut waiter = self.queue.waiter();
        let mut wanted = wanted;
        let mut looks = 0;
        loop {
            // In the queue first, then one more look: a place freed between the pick that
            // found every node full and this line is either seen by the look or handed to us.
            if let Some(slot) = waiter.enqueue(self.target(pick, wanted))
                && let Some(placed) = self.accept(slot, started)
            {
                return Ok(placed);
            }
            match self.reserve(pick) {
                Ok((index, slot)) => {
                    return Ok((index, InFlight::reserved(slot.into_node(), started)));
                }
                Err(None) => return Err(Unplaced::Nowhere),
                // The cookie's node went down, or the like: wait for what is wanted now. Nodes
                // that keep changing between two looks are churn, not progress: after a few
                // looks in a row, wait with the latest target.
                Err(Some(now)) if now != wanted => {
                    wanted = now;
                    looks += 1;
                    if looks < MAX_LOOKS {
                        continue;
                    }
                    if let Some(slot) = waiter.enqueue(self.target(pick, wanted))
                        && let Some(placed) = self.accept(slot, started)
                    {
                        return Ok(placed);
                    }
                }
                Err(Some(_)) => {}
            }
            looks = 0;
            match waiter.wake(deadline).await {
                Woken::Handed(slot) => {
                    if let Some(placed) = self.accept(slot, started) {
                        return Ok(placed);
                    }
                }
                // The pool changed: look again, keeping our place in the line.
                Woken::Nudged => {}
                Woken::TimedOut => return Err(Unplaced::QueueTimeout),
            }
        }
    }

    fn target(self: &Arc<Self>, pick: &Pick<'_>, wanted: Wanted) -> Target {
        match wanted {
            Wanted::Any => Target::Any {
                state: self.clone(),
                tried: pick.tried.into(),
            },
            Wanted::Node(index) => Target::Node(self.backends[index].node.clone()),
        }
    }

    /// A place handed over by a release, on a node of this snapshot the request may use
    /// (the queue hands places only to waiters whose target takes that node).
    fn accept(&self, slot: Slot, started: Instant) -> Option<(usize, InFlight)> {
        let index = self
            .backends
            .iter()
            .position(|b| Arc::ptr_eq(&b.node, slot.node()))?;
        Some((index, InFlight::reserved(slot.into_node(), started)))
    }
}

/// One place reserved below a node's cap, counted in its in-flight requests. Dropping it
/// frees the place, which goes to the first request waiting for it.
#[derive(Debug)]
pub struct Slot {
    /// `None` once it became an [`super::InFlight`], which releases the place itself.
    node: Option<Arc<Node>>,
}

impl Slot {
    /// A place on `node`, if it is below its cap.
    pub(super) fn take(node: &Arc<Node>) -> Option<Slot> {
        node.try_reserve().then(|| Slot {
            node: Some(node.clone()),
        })
    }

    #[expect(clippy::expect_used, reason = "a slot holds its node until into_node")]
    pub(super) fn node(&self) -> &Arc<Node> {
        self.node
            .as_ref()
            .expect("a slot holds its node until into_node")
    }

    /// The node, with the place still taken: the caller releases it.
    #[expect(clippy::expect_used, reason = "a slot holds its node until into_node")]
    pub(super) fn into_node(mut self) -> Arc<Node> {
        self.node
            .take()
            .expect("a slot holds its node until into_node")
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(node) = self.node.take() {
            node.release_capped();
        }
    }
}

/// What a waiting request waits for.
#[derive(Debug, Clone)]
pub enum Target {
    /// Room on any routable node of `state` other than those in `tried`.
    Any {
        /// The snapshot whose nodes it may use.
        state: Arc<PoolState>,
        /// Indices it has already tried and must not repeat.
        tried: Box<[usize]>,
    },
    /// Room on this node, while it serves its existing users (a sticky user's node, an
    /// `ip_hash` client's node).
    Node(Arc<Node>),
}

impl Target {
    /// A place freed on `node` is one this waiter may use.
    fn takes(&self, node: &Arc<Node>) -> bool {
        match self {
            Target::Any { state, tried } => {
                node.is_routable()
                    && state
                        .backends
                        .iter()
                        .position(|b| Arc::ptr_eq(&b.node, node))
                        .is_some_and(|index| !tried.contains(&index))
            }
            Target::Node(wanted) => Arc::ptr_eq(wanted, node) && node.serves_existing_users(),
        }
    }
}

/// What a waiter receives.
#[derive(Debug)]
enum Wake {
    /// A place on a node its target takes.
    Slot(Slot),
    /// The pool changed (a swap, a node down, up or draining): look again.
    Nudge,
}

#[derive(Debug)]
struct Entry {
    ticket: u64,
    target: Target,
    wake: oneshot::Sender<Wake>,
}

/// The requests of one pool waiting for room, oldest first.
pub struct WaitQueue {
    entries: Mutex<VecDeque<Entry>>,
    /// `entries.len()`, readable without the lock: a release looks here first.
    len: AtomicUsize,
    next_ticket: AtomicU64,
    /// `fulcrum_pool_queue_depth`.
    depth: Gauge,
}

impl std::fmt::Debug for WaitQueue {
    // Not the entries: a waiter's target holds a snapshot whose nodes hold this queue.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WaitQueue")
            .field("len", &self.len())
            .finish()
    }
}

/// How a wait ended.
#[derive(Debug)]
pub(super) enum Woken {
    Handed(Slot),
    Nudged,
    TimedOut,
}

impl Waiters for WaitQueue {
    fn released(&self, node: &Arc<Node>) {
        self.release_to_waiter(node);
    }

    fn nudge(&self) {
        self.wake_all();
    }
}

impl WaitQueue {
    /// An empty queue, its length exported as `depth`.
    pub fn new(depth: Gauge) -> Self {
        depth.set(0.0);
        Self {
            entries: Mutex::new(VecDeque::new()),
            len: AtomicUsize::new(0),
            next_ticket: AtomicU64::new(0),
            depth,
        }
    }

    /// Requests waiting now.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// No request is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(super) fn waiter(&self) -> Waiter<'_> {
        Waiter {
            queue: self,
            ticket: self.next_ticket.fetch_add(1, Ordering::Relaxed),
            wake: None,
        }
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<Entry>> {
        // Every critical section leaves the deque consistent, so a panic elsewhere cannot
        // have left it half changed.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn counted(&self, entries: &VecDeque<Entry>) {
        self.len.store(entries.len(), Ordering::SeqCst);
        self.depth.set(entries.len() as f64);
    }

    /// A place on `node` was freed: hand it to the first entry that takes it.
    #[expect(clippy::expect_used, reason = "the position was just found")]
    fn release_to_waiter(&self, node: &Arc<Node>) {
        if self.len.load(Ordering::SeqCst) == 0 {
            return;
        }
        let unsent = {
            let mut entries = self.lock();
            let Some(position) = entries.iter().position(|e| e.target.takes(node)) else {
                return;
            };
            // A request arriving meanwhile may have taken the place: then it is served, and
            // the waiter stays first in line for the next one.
            let Some(slot) = Slot::take(node) else {
                return;
            };
            let entry = entries
                .remove(position)
                .expect("the position was just found");
            self.counted(&entries);
            entry.wake.send(Wake::Slot(slot)).err()
        };
        // Only if the waiter vanished without taking its entry out, which its Drop prevents;
        // released outside the lock, since releasing locks it again.
        drop(unsent);
    }

    /// Wakes every waiter to look again: the pool changed under them.
    pub(in crate::model) fn wake_all(&self) {
        if self.len.load(Ordering::SeqCst) == 0 {
            return;
        }
        let mut entries = self.lock();
        for entry in entries.drain(..) {
            // A waiter that has gone needs no wake; a nudge holds no place to give back.
            entry.wake.send(Wake::Nudge).ok();
        }
        self.counted(&entries);
    }
}

/// One request's place in the line.
#[derive(Debug)]
pub(super) struct Waiter<'q> {
    queue: &'q WaitQueue,
    /// Its place in the line, kept when it re-enters after a nudge.
    ticket: u64,
    /// While an entry of ours is in the queue, or its wake-up in this channel.
    wake: Option<oneshot::Receiver<Wake>>,
}

impl Waiter<'_> {
    /// Puts our entry in the line at our ticket's place, waiting for `target` (replacing an
    /// entry we had). Returns a place handed to the entry it replaced, if one was.
    pub(super) fn enqueue(&mut self, target: Target) -> Option<Slot> {
        let (wake, receiver) = oneshot::channel();
        let delivered = {
            let mut entries = self.queue.lock();
            let delivered = self.withdraw(&mut entries);
            let position = entries.partition_point(|e| e.ticket < self.ticket);
            entries.insert(
                position,
                Entry {
                    ticket: self.ticket,
                    target,
                    wake,
                },
            );
            self.queue.counted(&entries);
            delivered
        };
        self.wake = Some(receiver);
        // Pairs with the SeqCst decrement in `release`: the caller's next look at the nodes,
        // made with relaxed loads, comes after our entry is visible to every release.
        fence(Ordering::SeqCst);
        match delivered {
            Some(Wake::Slot(slot)) => Some(slot),
            Some(Wake::Nudge) | None => None,
        }
    }

    /// Waits for a place or a nudge until `deadline`.
    pub(super) async fn wake(&mut self, deadline: tokio::time::Instant) -> Woken {
        let Some(receiver) = self.wake.as_mut() else {
            return Woken::Nudged;
        };
        let woken = match tokio::time::timeout_at(deadline, receiver).await {
            Ok(Ok(Wake::Slot(slot))) => Woken::Handed(slot),
            // An entry leaves the queue only with a send, so a closed channel is a nudge.
            Ok(Ok(Wake::Nudge) | Err(_)) => Woken::Nudged,
            Err(_) => {
                // A place may have been sent between the deadline and the lock: take it.
                let mut entries = self.queue.lock();
                let delivered = self.withdraw(&mut entries);
                self.queue.counted(&entries);
                return match delivered {
                    Some(Wake::Slot(slot)) => Woken::Handed(slot),
                    Some(Wake::Nudge) | None => Woken::TimedOut,
                };
            }
        };
        self.wake = None;
        woken
    }

    /// Takes our entry out of `entries`; if it had already been woken, the wake-up sent to it.
    fn withdraw(&mut self, entries: &mut VecDeque<Entry>) -> Option<Wake> {
        let mut receiver = self.wake.take()?;
        match entries.binary_search_by_key(&self.ticket, |e| e.ticket) {
            Ok(position) => {
                entries.remove(position);
                None
            }
            // Senders send under the lock we hold, so the wake-up is in the channel already.
            Err(_) => receiver.try_recv().ok(),
        }
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        if self.wake.is_none() {
            return;
        }
        let delivered = {
            let mut entries = self.queue.lock();
            let delivered = self.withdraw(&mut entries);
            self.queue.counted(&entries);
            delivered
        };
        // A place meant for us goes to the next in line; dropped outside the lock, since
        // releasing locks it again.
        drop(delivered);
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::*;
    use crate::base::config::{Config, PoolConfig};
    use crate::model::balance::Pick;
    use crate::model::pool::{InFlight, Placement, Pool, Unplaced, Wanted};

    fn config(name: &str, caps: &[u32], queue_timeout: &str) -> PoolConfig {
        config_with(name, caps, queue_timeout, "round_robin")
    }

    fn config_with(name: &str, caps: &[u32], queue_timeout: &str, strategy: &str) -> PoolConfig {
        let backends: Vec<String> = caps
            .iter()
            .enumerate()
            .map(|(i, cap)| {
                format!(
                    "{{ name = \"n{i}\", address = \"127.0.0.1:{}\", max_connections = {cap} }}",
                    30_000 + i
                )
            })
            .collect();
        let text = format!(
            "[[listeners]]\nbind = \"127.0.0.1:0\"\n[pools.{name}]\nstrategy = \"{strategy}\"\nqueue_timeout = \"{queue_timeout}\"\nbackends = [{}]\n",
            backends.join(", ")
        );
        Config::parse(Path::new("t.toml"), &text).unwrap().pools[name].clone()
    }

    fn pool(name: &str, caps: &[u32], queue_timeout: &str) -> Pool {
        Pool::new(name, &config(name, caps, queue_timeout))
    }

    fn placed(placement: Placement) -> (usize, InFlight) {
        match placement {
            Placement::Placed(index, in_flight) => (index, in_flight),
            other => panic!("expected a place, got {other:?}"),
        }
    }

    /// Spawns a request that waits for `wanted` and reports its id once placed, then ends.
    fn waiter(
        state: &Arc<PoolState>,
        id: u32,
        wanted: Wanted,
        served: &tokio::sync::mpsc::UnboundedSender<(u32, usize)>,
    ) -> tokio::task::JoinHandle<()> {
        waiter_for(state, id, Pick::plain(None), wanted, served)
    }

    fn waiter_for(
        state: &Arc<PoolState>,
        id: u32,
        pick: Pick<'static>,
        wanted: Wanted,
        served: &tokio::sync::mpsc::UnboundedSender<(u32, usize)>,
    ) -> tokio::task::JoinHandle<()> {
        let (state, served) = (state.clone(), served.clone());
        tokio::spawn(async move {
            let (index, _in_flight) = state
                .wait(&pick, wanted, Instant::now())
                .await
                .expect("placed");
            served.send((id, index)).unwrap();
        })
    }

    async fn until(what: &str, condition: impl Fn() -> bool) {
        for _ in 0..1000 {
            if condition() {
                return;
            }
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("timed out waiting until {what}");
    }

    #[test]
    fn racing_picks_never_put_a_node_over_its_cap() {
        let pool = pool("race", &[3, 2], "5s");
        let state = pool.snapshot();
        std::thread::scope(|scope| {
            for _ in 0..2 {
                scope.spawn(|| {
                    let mut held = std::collections::VecDeque::new();
                    for i in 0..50_000 {
                        if let Placement::Placed(index, in_flight) =
                            state.place(&Pick::plain(None), Instant::now())
                        {
                            let node = &state.backends[index].node;
                            assert!(node.in_flight() <= node.cap().unwrap(), "over the cap");
                            held.push_back(in_flight);
                        }
                        // Hold two or three places at a time, so the threads fill the pool.
                        if held.len() > 2 || i % 3 == 0 {
                            held.pop_front();
                        }
                    }
                });
            }
        });
        for backend in state.backends.iter() {
            assert_eq!(backend.node.in_flight(), 0, "every place was given back");
        }
    }

    #[tokio::test]
    async fn waiters_are_served_in_arrival_order_and_a_cancelled_one_passes_its_turn_on() {
        let pool = pool("fifo", &[1], "5s");
        let state = pool.snapshot();
        let queue = &state.queue;
        let (first, first_in_flight) = placed(state.place(&Pick::plain(None), Instant::now()));
        assert_eq!(first, 0);
        assert!(matches!(
            state.place(&Pick::plain(None), Instant::now()),
            Placement::Full(Wanted::Any)
        ));

        let (served, mut order) = tokio::sync::mpsc::unbounded_channel();
        let mut waiters = Vec::new();
        for id in 1..=4 {
            waiters.push(waiter(&state, id, Wanted::Any, &served));
            until("the waiter is in line", || queue.len() == id as usize).await;
        }

        // Waiter 2 leaves while waiting: its entry goes with it.
        waiters[1].abort();
        until("the cancelled waiter left the line", || queue.len() == 3).await;

        // The place goes to waiter 1, which is cancelled before it runs: the place it was
        // handed goes on to waiter 3, not lost.
        drop(first_in_flight);
        waiters[0].abort();
        assert!(waiters.remove(0).await.unwrap_err().is_cancelled());
        let (id, index) = order.recv().await.unwrap();
        assert_eq!((id, index), (3, 0));
        assert_eq!(order.recv().await.unwrap(), (4, 0), "then the next in line");
        assert!(queue.is_empty());
        assert_eq!(state.backends[0].node.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_waiter_bound_to_one_node_is_not_given_another_nodes_place() {
        let pool = Pool::new(
            "bound",
            &config_with("bound", &[1, 1], "5s", "sticky_cookie"),
        );
        let state = pool.snapshot();
        let (a, on_a) = placed(state.place(&Pick::plain(None), Instant::now()));
        let (b, on_b) = placed(state.place(&Pick::plain(None), Instant::now()));
        assert_ne!(a, b);
        let (served, mut order) = tokio::sync::mpsc::unbounded_channel();
        let cookie_for_b = Pick {
            cookie: crate::model::balance::CookieTarget::Node {
                index: b,
                expires: 0,
            },
            ..Pick::plain(None)
        };
        assert!(matches!(
            state.place(&cookie_for_b, Instant::now()),
            Placement::Full(Wanted::Node(index)) if index == b
        ));
        let _sticky = waiter_for(&state, 1, cookie_for_b, Wanted::Node(b), &served);
        until("the sticky user waits", || state.queue.len() == 1).await;
        let _any = waiter(&state, 2, Wanted::Any, &served);
        until("the new user waits", || state.queue.len() == 2).await;

        drop(on_a);
        assert_eq!(
            order.recv().await.unwrap(),
            (2, a),
            "first in line wants only b"
        );
        drop(on_b);
        assert_eq!(order.recv().await.unwrap(), (1, b));
    }

    #[tokio::test]
    async fn a_wait_ends_at_queue_timeout_and_leaves_the_line() {
        let pool = pool("timeout", &[1], "50ms");
        let state = pool.snapshot();
        let _held = placed(state.place(&Pick::plain(None), Instant::now()));
        let started = tokio::time::Instant::now();
        let waited = state
            .wait(&Pick::plain(None), Wanted::Any, Instant::now())
            .await;
        assert_eq!(waited.err(), Some(Unplaced::QueueTimeout));
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert!(state.queue.is_empty());

        let at_once = Pool::new("timeout0", &config("timeout0", &[1], "0s"));
        let state = at_once.snapshot();
        let _held = placed(state.place(&Pick::plain(None), Instant::now()));
        let waited = state
            .wait(&Pick::plain(None), Wanted::Any, Instant::now())
            .await;
        assert_eq!(waited.err(), Some(Unplaced::QueueTimeout));
    }

    #[tokio::test]
    async fn waiters_look_again_when_a_swap_raises_the_cap() {
        let pool = pool("raise", &[1], "5s");
        let state = pool.snapshot();
        let _held = placed(state.place(&Pick::plain(None), Instant::now()));
        let (served, mut order) = tokio::sync::mpsc::unbounded_channel();
        let _waiting = waiter(&state, 1, Wanted::Any, &served);
        until("the request waits", || state.queue.len() == 1).await;
        pool.replace(&config("raise", &[2], "5s"));
        assert_eq!(order.recv().await.unwrap(), (1, 0));
    }
}
