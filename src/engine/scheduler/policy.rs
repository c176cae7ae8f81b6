//! Who gets each step of the shared pass: the step policy.
//!
//! # Fairness policy
//! Each step computes at most `step_tokens` tokens (one chunk more when a single chunk is
//! larger). Who gets them is decided by the queue order. The default is **shortest remaining
//! work counted as if nothing were pruned** (SRPT on the admitted size): requests are ordered
//! by the token-layers they would still compute had pruning removed nothing (admitted tokens
//! times the layers ahead), ties by arrival. A step costs about one layer read however few
//! tokens ride in it, so a pruned large request still has all its steps ahead; ranked on its
//! pruned tokens it would hold up a small newcomer for all of them. The step's
//! layer is the layer of the first request in that order, except that a request of about its
//! size a few layers behind it catches up first (`shortest-unpruned-aligned`): the two then
//! share every later layer read instead of taking turns. The requests at that layer then
//! take their next chunks round robin in that order, one chunk each per round, until the budget
//! is spent (the order is strict: when the next chunk does not fit, the step is full and no
//! later request leapfrogs it with a smaller chunk). A small request therefore advances at
//! nearly every step from its arrival however large the running requests are, and a request
//! with thousands of candidates gets the steps small ones leave plus a ride in theirs. Plain
//! SRPT can starve a large request under a steady stream of small ones, so a request passed
//! over for `starve_after_steps` consecutive steps goes first (the starvation guard). See
//! [`plan_step`], which is pure and unit-tested.
//!
//! Other orders ([`Rank`]): plain shortest remaining work (on live tokens), least attained
//! service (newcomers first: most sharing, since newcomers catch up with each other, but a
//! small request deep into its layers waits for every newcomer to catch up with it), and most
//! shared (the layer most requests wait at). A
//! [`QueueOrder`] is a list of ranks that steps take in turn. docs/serve.md has the
//! measurements behind the default.
//!

use crate::error::{GratingError, Result};

/// Steps a request may be passed over before it goes first regardless of the queue order.
/// Long enough for a few small requests to run all their layers (28 for Qwen3-0.6B) between
/// two guarded steps of a large one: each guarded step is a whole large layer that every
/// small request at another layer waits for. Measured on H200s with streamed weights
/// (docs/serve.md): at 32, 6-7 such steps (about 40 ms) were in the slowest small requests'
/// latency; with the default order, the small p99 under load was at a median 2.87x its p99
/// alone at 32 and 2.67x at 96, and the p99 of all requests (the large ones) 0.84-1.03 s at
/// 32 and 1.12-1.38 s at 96.
pub const DEFAULT_STARVE_AFTER_STEPS: u32 = 96;

/// What one step's queue is sorted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rank {
    /// Least attained service first: token-layers computed so far, ties by arrival. Needs no
    /// size estimate; newcomers go first.
    LeastAttained,
    /// Least work left first: token-layers still to compute (its live tokens times the layers
    /// ahead, an upper bound since pruning only removes work), ties by arrival. Small requests
    /// are not preempted by large newcomers; fewer requests share each step.
    ShortestRemaining,
    /// The layer most requests are waiting at first (ties: least work left): one read serves
    /// the most requests.
    MostShared,
    /// Least work left first, except that a request a few layers behind the first one (at most
    /// `CATCH_UP_LAYERS`, 4) whose whole layer fits in the step goes first, so that it catches
    /// up and the two then share every later step. A step of a small request costs about one
    /// layer read whoever rides in it, so a short wait of the leader buys the trailing request
    /// all its later steps.
    ShortestRemainingAligned,
    /// Least work left as if nothing were pruned (its admitted tokens times the layers ahead),
    /// ties by arrival. A step costs about one layer read however few tokens ride in it, so
    /// pruning shrinks a request's tokens but not its steps: ranked on its pruned tokens, a
    /// large request with many layers ahead goes before a small newcomer and holds it up for
    /// all of them.
    ShortestUnprunedRemaining,
    /// [`Rank::ShortestUnprunedRemaining`], except that a request of about the first one's
    /// size (admitted tokens at most `ALIGN_SIZE_RATIO`, 1.5, times its) at most
    /// `CATCH_UP_LAYERS` behind it, whose layer fits in the step, goes first and catches up;
    /// the two then share every later read. Only requests of about the leader's size: a
    /// larger one catching up would make the leader wait for its heavier steps and then ride
    /// in every one of them.
    ShortestUnprunedAligned,
}

/// How far behind the request with the least work left a request may be and still catch up
/// with it under [`Rank::ShortestRemainingAligned`].
pub const CATCH_UP_LAYERS: usize = 4;

/// Steps a request may wait, over its life, for others to catch up with it: bounds what the
/// alignment costs the leader.
pub const MAX_DEFERRALS: u32 = 2 * CATCH_UP_LAYERS as u32;

/// Under [`Rank::ShortestUnprunedAligned`], a request catches up with the first one only if
/// its admitted tokens are at most this many times the first one's.
pub const ALIGN_SIZE_RATIO: f64 = 1.5;

impl Rank {
    fn name(self) -> &'static str {
        match self {
            Rank::LeastAttained => "least-attained",
            Rank::ShortestRemaining => "shortest-remaining",
            Rank::MostShared => "most-shared",
            Rank::ShortestRemainingAligned => "shortest-remaining-aligned",
            Rank::ShortestUnprunedRemaining => "shortest-unpruned-remaining",
            Rank::ShortestUnprunedAligned => "shortest-unpruned-aligned",
        }
    }

    /// Under an aligned rank, the largest admitted size (in tokens) of a request that may
    /// catch up with a first request of `leader_tokens`; `None` for other ranks.
    fn catch_up_limit(self, leader_tokens: u64) -> Option<u64> {
        match self {
            Rank::ShortestRemainingAligned => Some(u64::MAX),
            Rank::ShortestUnprunedAligned => Some((leader_tokens as f64 * ALIGN_SIZE_RATIO) as u64),
            _ => None,
        }
    }
}

/// The order in which admitted requests get the steps (see the module docs): step `i` is
/// ranked by `ranks[i % ranks.len()]`, so a list makes steps take turns between orders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueOrder {
    ranks: Vec<Rank>,
}

impl QueueOrder {
    pub fn new(ranks: Vec<Rank>) -> Result<QueueOrder> {
        if ranks.is_empty() {
            return Err(GratingError::InvalidInput(
                "a queue order needs a rank".into(),
            ));
        }
        Ok(QueueOrder { ranks })
    }

    pub fn least_attained() -> QueueOrder {
        QueueOrder {
            ranks: vec![Rank::LeastAttained],
        }
    }

    pub fn shortest_remaining() -> QueueOrder {
        QueueOrder {
            ranks: vec![Rank::ShortestRemaining],
        }
    }

    pub fn shortest_unpruned_aligned() -> QueueOrder {
        QueueOrder {
            ranks: vec![Rank::ShortestUnprunedAligned],
        }
    }

    /// Even steps to the request with the least work left, odd steps to the one with the
    /// least attained service.
    pub fn alternating() -> QueueOrder {
        QueueOrder {
            ranks: vec![Rank::ShortestRemaining, Rank::LeastAttained],
        }
    }

    /// The rank that orders step number `step`.
    pub fn rank(&self, step: u64) -> Rank {
        self.ranks[(step % self.ranks.len() as u64) as usize]
    }
}

/// Shortest remaining work counted as if nothing were pruned, with requests of the leader's
/// size catching up with it: measured side by side with the same order without catching up
/// on H200s with streamed weights (docs/serve.md), 16-21% more throughput at concurrency 16
/// and a small-request p99 at a median 2.9x its p99 alone instead of 3.2x (2.7x with the
/// default starvation guard).
impl Default for QueueOrder {
    fn default() -> Self {
        QueueOrder::shortest_unpruned_aligned()
    }
}

impl std::fmt::Display for QueueOrder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.ranks.iter().map(|r| r.name()).collect();
        f.write_str(&names.join(","))
    }
}

impl std::str::FromStr for QueueOrder {
    type Err = GratingError;
    /// A comma-separated list of `least-attained`, `shortest-remaining`, `most-shared`,
    /// `shortest-remaining-aligned`, `shortest-unpruned-remaining`, `shortest-unpruned-aligned`;
    /// `alternating` stands for `shortest-remaining,least-attained`.
    fn from_str(s: &str) -> Result<QueueOrder> {
        let mut ranks = Vec::new();
        for part in s.split(',').map(str::trim) {
            match part {
                "least-attained" => ranks.push(Rank::LeastAttained),
                "shortest-remaining" => ranks.push(Rank::ShortestRemaining),
                "most-shared" => ranks.push(Rank::MostShared),
                "shortest-remaining-aligned" => ranks.push(Rank::ShortestRemainingAligned),
                "shortest-unpruned-remaining" => ranks.push(Rank::ShortestUnprunedRemaining),
                "shortest-unpruned-aligned" => ranks.push(Rank::ShortestUnprunedAligned),
                "alternating" => ranks.extend(QueueOrder::alternating().ranks),
                other => {
                    return Err(GratingError::InvalidInput(format!(
                        "unknown queue order {other:?} (least-attained, shortest-remaining, \
                         shortest-remaining-aligned, shortest-unpruned-remaining, \
                         shortest-unpruned-aligned, most-shared, alternating, or a \
                         comma-separated list of them)"
                    )))
                }
            }
        }
        QueueOrder::new(ranks)
    }
}

impl serde::Serialize for QueueOrder {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Decides each step of the shared pass: the layer it runs, and whose chunks ride in it. The
/// scheduler asks once per step and once more to predict the next step (to read its layer
/// ahead), so a policy must be a pure function of what it is shown.
pub trait StepPolicy: Send + Sync {
    /// Plans step number `step` over the admitted requests `cands` within `budget` tokens
    /// (at least one chunk runs whatever its size); `None` when nobody has work.
    fn plan(&self, cands: &[StepCandidate], budget: usize, step: u64) -> Option<StepPlan>;

    /// How /info and the logs name the policy.
    fn describe(&self) -> String;
}

/// The built-in policies: a [`QueueOrder`] (ranks taken in turn) with the starvation guard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankedPolicy {
    pub order: QueueOrder,
    /// Steps a request may be passed over before it goes first regardless of the order.
    pub starve_after_steps: u32,
}

impl Default for RankedPolicy {
    fn default() -> Self {
        RankedPolicy {
            order: QueueOrder::default(),
            starve_after_steps: DEFAULT_STARVE_AFTER_STEPS,
        }
    }
}

impl StepPolicy for RankedPolicy {
    fn plan(&self, cands: &[StepCandidate], budget: usize, step: u64) -> Option<StepPlan> {
        plan_step(
            cands,
            budget,
            self.starve_after_steps.max(1),
            self.order.rank(step),
        )
    }

    fn describe(&self) -> String {
        self.order.to_string()
    }
}

/// What [`plan_step`] knows of one admitted request.
#[derive(Debug, Clone, PartialEq)]
pub struct StepCandidate {
    /// Arrival order.
    pub seq: u64,
    /// The layer (0-based) its next chunks run.
    pub layer: usize,
    /// Token-layers computed for it so far.
    pub attained: u64,
    /// Token-layers still to compute at most: its tokens left at `layer`, plus its live
    /// tokens for every later layer.
    pub remaining: u64,
    /// Its tokens when admitted, before any pruning.
    pub admitted_tokens: u64,
    /// Consecutive steps it had work but was passed over.
    pub idle_steps: u32,
    /// Steps it led the queue but waited for a trailing request to catch up.
    pub deferrals: u32,
    /// Tokens of its chunks still to run at `layer`, in order.
    pub chunk_tokens: Vec<usize>,
    /// Tokens of all its live chunks (what it runs at the next layer unless pruning shrinks
    /// it).
    pub live_chunk_tokens: Vec<usize>,
}

/// A planned step: the layer, and `(request position, chunks to run)` in service order.
#[derive(Debug, Clone, PartialEq)]
pub struct StepPlan {
    pub layer: usize,
    pub work: Vec<(usize, usize)>,
    /// The request that led the queue but waits this step for a trailing one to catch up.
    pub deferred: Option<usize>,
}

impl StepCandidate {
    /// `remaining` scaled from its live tokens up to its admitted ones: its admitted tokens
    /// times the layers ahead, counting the part of this layer still to run.
    pub fn unpruned_remaining(&self) -> u64 {
        let live: u64 = self.live_chunk_tokens.iter().map(|&t| t as u64).sum();
        let scaled =
            self.remaining as u128 * self.admitted_tokens.max(live) as u128 / live.max(1) as u128;
        scaled.min(u64::MAX as u128) as u64
    }
}

impl StepPlan {
    /// Updates request `i`'s waiting counters for this step: passed-over steps (the
    /// starvation guard) and steps it led but waited for a trailing request.
    pub(crate) fn count_waits(&self, i: usize, idle_steps: &mut u32, deferrals: &mut u32) {
        if self.work.iter().any(|w| w.0 == i) {
            *idle_steps = 0;
        } else {
            *idle_steps = idle_steps.saturating_add(1);
        }
        if self.deferred == Some(i) {
            *deferrals += 1;
        }
    }
}

/// The fairness policy (see the module docs): the order of `rank` with a starvation guard,
/// the layer of the first request (or of a trailing one catching up, under
/// [`Rank::ShortestRemainingAligned`] and [`Rank::ShortestUnprunedAligned`]), then chunks of
/// the requests at that layer, round robin
/// in that order (one chunk each per round), within `budget` (at least one chunk).
pub fn plan_step(
    cands: &[StepCandidate],
    budget: usize,
    starve_after: u32,
    rank: Rank,
) -> Option<StepPlan> {
    let mut order: Vec<usize> = (0..cands.len())
        .filter(|&i| !cands[i].chunk_tokens.is_empty())
        .collect();
    // Requests with work at each layer (for `MostShared`).
    let mut waiting_at: Vec<u64> = Vec::new();
    if rank == Rank::MostShared {
        for &i in &order {
            let l = cands[i].layer;
            if waiting_at.len() <= l {
                waiting_at.resize(l + 1, 0);
            }
            waiting_at[l] += 1;
        }
    }
    order.sort_by_cached_key(|&i| {
        let c = &cands[i];
        let (first, second) = match rank {
            Rank::ShortestRemaining | Rank::ShortestRemainingAligned => (c.remaining, 0),
            Rank::LeastAttained => (c.attained, 0),
            Rank::MostShared => (u64::MAX - waiting_at[c.layer], c.remaining),
            Rank::ShortestUnprunedRemaining | Rank::ShortestUnprunedAligned => {
                (c.unpruned_remaining(), 0)
            }
        };
        (c.idle_steps < starve_after, first, second, c.seq)
    });
    let head_index = *order.first()?;
    let head = &cands[head_index];
    let mut layer = head.layer;
    let mut deferred = None;
    let may_wait = head.idle_steps < starve_after && head.deferrals < MAX_DEFERRALS;
    if let Some(limit) = rank
        .catch_up_limit(head.admitted_tokens)
        .filter(|_| may_wait)
    {
        // The furthest behind of the cheap requests within reach catches up first (it picks
        // up the others on its way).
        let trailing = order
            .iter()
            .map(|&i| &cands[i])
            .filter(|c| c.layer < layer && layer - c.layer <= CATCH_UP_LAYERS)
            .filter(|c| c.admitted_tokens <= limit)
            .filter(|c| c.chunk_tokens.iter().sum::<usize>() <= budget)
            .map(|c| c.layer)
            .min();
        if let Some(t) = trailing {
            layer = t;
            deferred = Some(head_index);
        }
    }
    let at_layer: Vec<usize> = order
        .into_iter()
        .filter(|&i| cands[i].layer == layer)
        .collect();
    // Round robin in rank order, one chunk per request per round, so every request at the
    // layer gets a share of the step (and of the layer read) before any gets a second chunk.
    let mut taken = vec![0usize; at_layer.len()];
    let mut used = 0usize;
    'rounds: loop {
        let mut progressed = false;
        for (j, &i) in at_layer.iter().enumerate() {
            let Some(&t) = cands[i].chunk_tokens.get(taken[j]) else {
                continue;
            };
            if used > 0 && used + t > budget {
                break 'rounds;
            }
            used += t;
            taken[j] += 1;
            progressed = true;
        }
        if !progressed {
            break;
        }
    }
    let work = at_layer
        .into_iter()
        .zip(taken)
        .filter(|&(_, n)| n > 0)
        .collect();
    Some(StepPlan {
        layer,
        work,
        deferred,
    })
}

/// The layer of the step after `plan`, as far as the scheduler can tell now: the candidates
/// are advanced by the plan (a request that completes its layer moves on with all its live
/// chunks, one past the last layer leaves) and planned again. Arrivals and pruning can change
/// it; the streamed layer read ahead for it is then wasted and the step reads its own.
pub fn predict_next_layer(
    cands: &[StepCandidate],
    plan: &StepPlan,
    num_layers: usize,
    budget: usize,
    policy: &dyn StepPolicy,
    next_step: u64,
) -> Option<usize> {
    let mut after: Vec<StepCandidate> = Vec::with_capacity(cands.len());
    for (i, c) in cands.iter().enumerate() {
        let mut c = c.clone();
        plan.count_waits(i, &mut c.idle_steps, &mut c.deferrals);
        if let Some(&(_, n)) = plan.work.iter().find(|w| w.0 == i) {
            let n = n.min(c.chunk_tokens.len());
            let ran: usize = c.chunk_tokens.drain(..n).sum();
            c.attained += ran as u64;
            c.remaining = c.remaining.saturating_sub(ran as u64);
            if c.chunk_tokens.is_empty() {
                c.layer += 1;
                if c.layer >= num_layers {
                    continue;
                }
                c.chunk_tokens = c.live_chunk_tokens.clone();
            }
        }
        after.push(c);
    }
    policy.plan(&after, budget, next_step).map(|p| p.layer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(seq: u64, layer: usize, attained: u64, chunks: &[usize]) -> StepCandidate {
        StepCandidate {
            seq,
            layer,
            attained,
            remaining: 0,
            admitted_tokens: chunks.iter().sum::<usize>() as u64,
            idle_steps: 0,
            deferrals: 0,
            chunk_tokens: chunks.to_vec(),
            live_chunk_tokens: chunks.to_vec(),
        }
    }

    /// A candidate with `remaining` token-layers left (attained service 0).
    fn left(seq: u64, layer: usize, remaining: u64, chunks: &[usize]) -> StepCandidate {
        StepCandidate {
            remaining,
            ..cand(seq, layer, 0, chunks)
        }
    }

    /// The layer of the step `plan_step` plans (there is work).
    fn step_layer(c: &[StepCandidate], budget: usize, starve_after: u32, rank: Rank) -> usize {
        plan_step(c, budget, starve_after, rank)
            .expect("a step is planned")
            .layer
    }

    /// The next step's layer under a one-rank policy.
    fn predict(
        c: &[StepCandidate],
        p: &StepPlan,
        num_layers: usize,
        budget: usize,
        starve_after: u32,
        rank: Rank,
    ) -> Option<usize> {
        let policy = RankedPolicy {
            order: QueueOrder::new(vec![rank]).unwrap(),
            starve_after_steps: starve_after,
        };
        predict_next_layer(c, p, num_layers, budget, &policy, 0)
    }

    const LAS: Rank = Rank::LeastAttained;
    const SRPT: Rank = Rank::ShortestRemaining;

    #[test]
    fn least_attained_service_goes_first_and_sets_the_layer() {
        // A big request deep into layer 3, two newcomers at layer 0.
        let c = vec![
            cand(0, 3, 50_000, &[4000, 4000, 4000]),
            cand(1, 0, 0, &[1800]),
            cand(2, 0, 0, &[900]),
        ];
        let p = plan_step(&c, 8192, 64, LAS).unwrap();
        assert_eq!(p.layer, 0);
        assert_eq!(p.work, vec![(1, 1), (2, 1)]);
    }

    #[test]
    fn ties_are_broken_by_arrival() {
        let c = vec![cand(7, 0, 0, &[100]), cand(3, 0, 0, &[100])];
        let p = plan_step(&c, 8192, 64, LAS).unwrap();
        assert_eq!(p.work, vec![(1, 1), (0, 1)]);
    }

    #[test]
    fn the_budget_is_shared_round_robin_and_order_is_strict() {
        // One chunk each per round in LAS order; request 0's second chunk no longer fits.
        let c = vec![
            cand(0, 2, 10, &[3000, 3000, 3000]),
            cand(1, 2, 20, &[3000]),
            cand(2, 2, 30, &[500]),
        ];
        let p = plan_step(&c, 8192, 64, LAS).unwrap();
        assert_eq!(p.layer, 2);
        assert_eq!(p.work, vec![(0, 1), (1, 1), (2, 1)]);
        // Rounds continue while chunks fit.
        let c = vec![cand(0, 0, 0, &[1000; 5]), cand(1, 0, 5, &[1000, 1000])];
        assert_eq!(
            plan_step(&c, 5000, 64, LAS).unwrap().work,
            vec![(0, 3), (1, 2)]
        );
        // Request 1's chunk does not fit, so the smaller chunk of request 2 (later in LAS
        // order) does not leapfrog it.
        let c = vec![
            cand(0, 2, 10, &[3000, 3000]),
            cand(1, 2, 20, &[6000]),
            cand(2, 2, 30, &[500]),
        ];
        assert_eq!(plan_step(&c, 8192, 64, LAS).unwrap().work, vec![(0, 1)]);
        // A chunk larger than the budget still runs, alone.
        let c = vec![cand(0, 0, 0, &[20_000, 100])];
        assert_eq!(plan_step(&c, 8192, 64, LAS).unwrap().work, vec![(0, 1)]);
    }

    #[test]
    fn requests_at_other_layers_wait() {
        let c = vec![
            cand(0, 1, 100, &[100]),
            cand(1, 4, 50, &[100]),
            cand(2, 1, 200, &[100]),
        ];
        let p = plan_step(&c, 8192, 64, LAS).unwrap();
        assert_eq!(p.layer, 4);
        assert_eq!(p.work, vec![(1, 1)]);
    }

    #[test]
    fn starved_requests_go_first() {
        let mut big = cand(0, 5, 1_000_000, &[4000]);
        big.idle_steps = 64;
        let c = vec![big, cand(1, 0, 0, &[100])];
        let p = plan_step(&c, 8192, 64, LAS).unwrap();
        assert_eq!(p.layer, 5);
        assert_eq!(p.work, vec![(0, 1)]);
    }

    #[test]
    fn nothing_to_do_plans_nothing() {
        assert_eq!(plan_step(&[], 8192, 64, SRPT), None);
        assert_eq!(plan_step(&[cand(0, 0, 0, &[])], 8192, 64, SRPT), None);
    }

    #[test]
    fn alternating_steps_take_turns_between_the_two_orders() {
        let order = QueueOrder::alternating();
        let ranks: Vec<Rank> = (0..4).map(|s| order.rank(s)).collect();
        assert_eq!(ranks, vec![SRPT, LAS, SRPT, LAS]);
        assert_eq!(QueueOrder::least_attained().rank(0), LAS);
        assert_eq!(QueueOrder::shortest_remaining().rank(1), SRPT);
        // Parsed from lists, printed back.
        let o: QueueOrder = "shortest-remaining, shortest-remaining,most-shared"
            .parse()
            .unwrap();
        assert_eq!(
            (o.rank(0), o.rank(1), o.rank(2)),
            (SRPT, SRPT, Rank::MostShared)
        );
        assert_eq!(o.rank(5), Rank::MostShared);
        assert_eq!(
            o.to_string(),
            "shortest-remaining,shortest-remaining,most-shared"
        );
        assert_eq!("alternating".parse::<QueueOrder>().unwrap(), order);
        assert!("fastest".parse::<QueueOrder>().is_err());
        assert!("".parse::<QueueOrder>().is_err());
        // A small request part way through, a big newcomer: the even step serves the small
        // one, the odd step the newcomer.
        let small = StepCandidate {
            attained: 9 * 6000,
            ..left(0, 9, 20 * 6000, &[6000])
        };
        let c = vec![small, left(1, 0, 28 * 90_000, &[8192; 11])];
        assert_eq!(step_layer(&c, 32_768, 64, order.rank(0)), 9);
        assert_eq!(step_layer(&c, 32_768, 64, order.rank(1)), 0);
    }

    #[test]
    fn most_shared_serves_the_layer_the_most_requests_wait_at() {
        // Three requests at layer 4, one (with the least work left) at layer 9.
        let c = vec![
            left(0, 9, 10, &[100]),
            left(1, 4, 500, &[100]),
            left(2, 4, 400, &[100]),
            left(3, 4, 900, &[100]),
        ];
        let p = plan_step(&c, 8192, 64, Rank::MostShared).unwrap();
        assert_eq!(p.layer, 4);
        // At the layer, least work left first.
        assert_eq!(p.work, vec![(2, 1), (1, 1), (3, 1)]);
        // A tie in requests goes to the layer holding the least work left.
        let c = vec![left(0, 9, 10, &[100]), left(1, 4, 500, &[100])];
        assert_eq!(step_layer(&c, 8192, 64, Rank::MostShared), 9);
        // Requests with nothing to run at their layer are not counted.
        let c = vec![
            left(0, 9, 10, &[100]),
            left(1, 4, 500, &[100]),
            left(2, 4, 400, &[]),
        ];
        assert_eq!(step_layer(&c, 8192, 64, Rank::MostShared), 9);
    }

    #[test]
    fn aligned_order_lets_a_cheap_request_close_behind_catch_up() {
        const ALIGNED: Rank = Rank::ShortestRemainingAligned;
        // The head (least work left) at layer 10; cheap requests 2 and 3 layers behind, one
        // 9 behind, and a request 1 behind whose layer does not fit in the step.
        let c = vec![
            left(0, 10, 1000, &[500]),
            left(1, 8, 5000, &[500]),
            left(2, 7, 5000, &[500]),
            left(3, 1, 5000, &[500]),
            left(4, 9, 9000, &[6000, 6000]),
        ];
        let p = plan_step(&c, 8192, 64, ALIGNED).unwrap();
        assert_eq!(p.layer, 7);
        assert_eq!(p.work, vec![(2, 1)]);
        // Plain shortest-remaining serves the head.
        assert_eq!(step_layer(&c, 8192, 64, SRPT), 10);
        // Nobody within reach: the head's layer.
        let c = vec![left(0, 10, 1000, &[500]), left(3, 1, 5000, &[500])];
        assert_eq!(step_layer(&c, 8192, 64, ALIGNED), 10);
        // A starved request still goes first.
        let mut starved = left(0, 20, 1_000_000, &[500]);
        starved.idle_steps = 64;
        let c = vec![starved, left(1, 18, 10, &[500])];
        assert_eq!(step_layer(&c, 8192, 64, ALIGNED), 20);
        assert_eq!(
            "shortest-remaining-aligned"
                .parse::<QueueOrder>()
                .unwrap()
                .rank(0),
            ALIGNED
        );
        // The plan names the leader that waits; once it has waited MAX_DEFERRALS steps it
        // goes first.
        let c = vec![left(0, 10, 1000, &[500]), left(1, 8, 5000, &[500])];
        let p = plan_step(&c, 8192, 64, ALIGNED).unwrap();
        assert_eq!((p.layer, p.deferred), (8, Some(0)));
        let mut patient = left(0, 10, 1000, &[500]);
        patient.deferrals = MAX_DEFERRALS;
        let c = vec![patient, left(1, 8, 5000, &[500])];
        let p = plan_step(&c, 8192, 64, ALIGNED).unwrap();
        assert_eq!((p.layer, p.deferred), (10, None));
    }

    #[test]
    fn unpruned_aligned_lets_only_a_request_of_the_leaders_size_catch_up() {
        const ALIGNED: Rank = Rank::ShortestUnprunedAligned;
        // The leader: a small request (3000 tokens) at layer 12. Behind it: a small newcomer
        // (4000 tokens, within 1.5x) 3 layers back, and a pruned large one (admitted 40000,
        // 2000 live) 2 layers back whose layer would fit in the step.
        let leader = left(0, 12, 3_000 * 16, &[3_000]);
        let newcomer = left(1, 9, 4_000 * 19, &[4_000]);
        let large = StepCandidate {
            admitted_tokens: 40_000,
            ..left(2, 10, 2_000 * 18, &[2_000])
        };
        let c = vec![leader.clone(), newcomer.clone(), large.clone()];
        let p = plan_step(&c, 32_768, 64, ALIGNED).unwrap();
        assert_eq!(
            (p.layer, p.work.clone(), p.deferred),
            (9, vec![(1, 1)], Some(0))
        );
        // The old aligned rank lets the large one catch up as well (it is furthest behind
        // only if it is the one further back).
        let far_large = StepCandidate {
            layer: 8,
            ..large.clone()
        };
        let c2 = vec![leader.clone(), newcomer.clone(), far_large.clone()];
        assert_eq!(
            step_layer(&c2, 32_768, 64, Rank::ShortestRemainingAligned),
            8
        );
        assert_eq!(step_layer(&c2, 32_768, 64, ALIGNED), 9);
        // Without a request of its size behind it the leader goes first.
        let c = vec![leader.clone(), large];
        let p = plan_step(&c, 32_768, 64, ALIGNED).unwrap();
        assert_eq!((p.layer, p.deferred), (12, None));
        // Too far behind (more than CATCH_UP_LAYERS), or the leader has waited enough.
        let far = left(1, 12 - CATCH_UP_LAYERS - 1, 3_000 * 28, &[3_000]);
        assert_eq!(step_layer(&[leader.clone(), far], 32_768, 64, ALIGNED), 12);
        let patient = StepCandidate {
            deferrals: MAX_DEFERRALS,
            ..leader
        };
        assert_eq!(step_layer(&[patient, newcomer], 32_768, 64, ALIGNED), 12);
        assert_eq!(
            "shortest-unpruned-aligned".parse::<QueueOrder>().unwrap(),
            QueueOrder::new(vec![ALIGNED]).unwrap()
        );
    }

    #[test]
    fn the_next_step_is_predicted_from_the_plan() {
        // A request that completes its layer moves on: the next step is at its next layer.
        let c = vec![cand(0, 3, 0, &[1000])];
        let p = plan_step(&c, 4096, 64, LAS).unwrap();
        assert_eq!(predict(&c, &p, 28, 4096, 64, LAS), Some(4));
        // Chunks left beyond the budget: the next step stays at the same layer.
        let c = vec![cand(0, 3, 0, &[4000, 4000, 4000])];
        let p = plan_step(&c, 4096, 64, LAS).unwrap();
        assert_eq!(p.work, vec![(0, 1)]);
        assert_eq!(predict(&c, &p, 28, 4096, 64, LAS), Some(3));
        // After its last layer a request leaves; the next step is another request's layer.
        let c = vec![cand(0, 27, 0, &[100]), cand(1, 9, 500, &[100])];
        let p = plan_step(&c, 4096, 64, LAS).unwrap();
        assert_eq!(p.layer, 27);
        assert_eq!(predict(&c, &p, 28, 4096, 64, LAS), Some(9));
        // Under LAS the service of this step can hand the next step to someone else.
        let c = vec![cand(0, 0, 0, &[3000]), cand(1, 5, 1000, &[100])];
        let p = plan_step(&c, 4096, 64, LAS).unwrap();
        assert_eq!(p.layer, 0);
        assert_eq!(predict(&c, &p, 28, 4096, 64, LAS), Some(5));
        // A request moving on runs all its live chunks at the next layer (not just the rest).
        let mut big = cand(0, 2, 0, &[500]);
        big.live_chunk_tokens = vec![4000, 4000, 500];
        let c = vec![big, cand(1, 3, 1, &[100])];
        let p = plan_step(&c, 4096, 64, SRPT).unwrap();
        assert_eq!(predict(&c, &p, 28, 4096, 64, SRPT), Some(3));
        assert_eq!(predict(&[], &p, 28, 4096, 64, SRPT), None);
    }

    #[test]
    fn shortest_remaining_work_goes_first_whatever_arrived_last() {
        // A small request deep into its layers, a big newcomer at layer 0: under LAS the
        // newcomer (nothing attained) would go first; here the small one does, and the big
        // one rides along only when it is at the same layer.
        let small = StepCandidate {
            attained: 9 * 6000,
            ..left(0, 9, 20 * 6000, &[6000])
        };
        let c = vec![small, left(1, 0, 28 * 90_000, &[8192; 11])];
        let p = plan_step(&c, 32_768, 64, SRPT).unwrap();
        assert_eq!(p.layer, 9);
        assert_eq!(p.work, vec![(0, 1)]);
        let p = plan_step(&c, 32_768, 64, LAS).unwrap();
        assert_eq!(p.layer, 0);
        // Same layer: the small request's chunk first, then the big one's chunks in the
        // rest of the budget.
        let c = vec![
            left(0, 3, 28 * 90_000, &[8192; 11]),
            left(1, 3, 25 * 6000, &[6000]),
        ];
        let p = plan_step(&c, 32_768, 64, SRPT).unwrap();
        assert_eq!(p.work, vec![(1, 1), (0, 3)]);
        // Ties by arrival; the starvation guard still overrides.
        let c = vec![left(5, 0, 100, &[10]), left(2, 1, 100, &[10])];
        assert_eq!(plan_step(&c, 8192, 64, SRPT).unwrap().work, vec![(1, 1)]);
        let mut starved = left(0, 7, 1_000_000, &[4000]);
        starved.idle_steps = 64;
        let c = vec![starved, left(1, 0, 10, &[10])];
        assert_eq!(step_layer(&c, 8192, 64, SRPT), 7);
    }

    #[test]
    fn unpruned_remaining_keeps_a_pruned_large_request_behind_a_small_newcomer() {
        const UNPRUNED: Rank = Rank::ShortestUnprunedRemaining;
        // A large request pruned from 48000 to 2000 live tokens, 10 layers ahead of layer 17,
        // and a small newcomer at layer 0 with 3000 tokens for 28 layers.
        let pruned = StepCandidate {
            admitted_tokens: 48_000,
            ..left(1, 17, 2_000 * 11, &[2_000])
        };
        let small = left(2, 0, 3_000 * 28, &[3_000]);
        assert_eq!(pruned.unpruned_remaining(), 48_000 * 11);
        assert_eq!(small.unpruned_remaining(), 3_000 * 28);
        let cands = [pruned.clone(), small.clone()];
        // Its pruned tokens put the large request first under plain shortest-remaining...
        assert_eq!(step_layer(&cands, 4096, 32, SRPT), 17);
        // ...but its admitted tokens put the small one first.
        let plan = plan_step(&cands, 4096, 32, UNPRUNED).unwrap();
        assert_eq!((plan.layer, plan.work.clone()), (0, vec![(1, 1)]));
        // Part of a layer done counts in proportion: half of its live chunks left at this
        // layer is half a layer of its admitted tokens.
        let half = StepCandidate {
            admitted_tokens: 8_000,
            chunk_tokens: vec![1_000],
            ..left(3, 26, 1_000 + 2_000, &[1_000, 1_000])
        };
        assert_eq!(half.unpruned_remaining(), 4_000 + 8_000);
        // With near-equal sizes it is shortest-remaining: the one further along goes first,
        // and the starvation guard still overrides it.
        let ahead = left(4, 20, 3_000 * 8, &[3_000]);
        let cands = [small.clone(), ahead.clone()];
        assert_eq!(step_layer(&cands, 4096, 32, UNPRUNED), 20);
        let starved = StepCandidate {
            idle_steps: 32,
            ..small
        };
        assert_eq!(step_layer(&[starved, ahead], 4096, 32, UNPRUNED), 0);
        assert_eq!(
            "shortest-unpruned-remaining".parse::<QueueOrder>().unwrap(),
            QueueOrder::new(vec![UNPRUNED]).unwrap()
        );
    }
}
