//! Activation checkpointing and a hook that marks the forward's stages.
//!
//! A checkpointed block runs its forward without recording a gradient graph, so its
//! intermediates are freed at once and only its input and output stay alive for the backward
//! pass. There the block is run again on the saved input, this time recording the graph, and
//! differentiated at once (PyTorch's `torch.utils.checkpoint`). The recomputation repeats the
//! same operations on the same values (the blocks draw nothing at random), so the gradients
//! equal those of the plain run.
//!
//! The same mechanism runs, in every training forward, over the composed pieces whose
//! autograd would keep many full-size intermediates for few flops (the norms, RoPE, a Mamba
//! mixer between its projections, each chunk of heads of an attention): a [`segment`] keeps
//! its input and output only and recomputes the rest in the backward pass.
//!
//! candle's autograd gives a custom op gradients for its arguments only, so the gradients of
//! the block's parameters travel on a side channel, the model's [`Stash`], which
//! [`crate::Model::backward`] merges into the gradients it returns.

use std::cell::{Cell, RefCell};
use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Storage, Tensor, Var};

use crate::layers::{compute_dtype, Autocast, GradMode};
use crate::Result;

/// The gradients of checkpointed blocks' parameters from the backward pass under way.
#[derive(Clone)]
pub struct Stash {
    grads: Arc<Mutex<GradStore>>,
    /// A trainable parameter, given to each checkpoint op as an argument: an op enters the
    /// gradient graph only if an argument is in it, and a block's input may not be (the image
    /// at the first block), while its parameters always are.
    anchor: Tensor,
}

impl std::fmt::Debug for Stash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Stash({} gradients)", self.len())
    }
}

impl Stash {
    /// A stash whose ops hang on `anchor`, a trainable parameter of the model.
    pub fn new(anchor: Tensor) -> Self {
        Stash {
            grads: Arc::default(),
            anchor,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GradStore> {
        self.grads.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the stashed gradients out, leaving the stash empty.
    pub fn take(&self) -> GradStore {
        std::mem::take(&mut *self.lock())
    }

    pub fn len(&self) -> usize {
        self.lock().get_ids().count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `grads` with every gradient detached from the graph it was computed with.
///
/// candle's backward pass leaves the gradients of leaf variables attached to the forward
/// graph (a product's gradient is `grad · other`, and `other` carries its graph), so a gradient
/// store would keep every forward intermediate alive until it is dropped; detached, it holds
/// the gradients only.
pub fn detached(mut grads: GradStore) -> GradStore {
    let ids: Vec<_> = grads.get_ids().copied().collect();
    for id in ids {
        if let Some(g) = grads.get_id(id).map(Tensor::detach) {
            grads.insert_id(id, g);
        }
    }
    grads
}

type Block = dyn Fn(&[Tensor]) -> Result<Tensor> + Send + Sync;

/// `f(x)` with `f`'s intermediates recomputed in the backward pass instead of kept.
///
/// `f` must be deterministic (no random draws, no state updates but those
/// [`recomputing`] guards) and use the model's parameters through [`crate::layers::p`]; the
/// gradients of those parameters go to `stash`.
pub fn checkpoint(
    x: &Tensor,
    stash: &Stash,
    f: impl Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    run(&[x], stash, Arc::new(move |xs: &[Tensor]| f(&xs[0])))
}

/// [`checkpoint`] of a function of two tensors (e.g. a conv block on the concatenation of an
/// upsampled map and a skip connection: the concatenation is then not kept either).
pub fn checkpoint2(
    a: &Tensor,
    b: &Tensor,
    stash: &Stash,
    f: impl Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    run(
        &[a, b],
        stash,
        Arc::new(move |xs: &[Tensor]| f(&xs[0], &xs[1])),
    )
}

/// A block's backward pass written by hand: from what the forward saved and the gradient of
/// the block's output, the gradients of its inputs (`None` for one that needs none) and of its
/// parameters, as (parameter, gradient) pairs. It runs without a gradient graph.
pub(crate) type HandBackward = dyn Fn(Saved, &Tensor) -> Result<HandGrads> + Send + Sync;

/// What a block with a hand-written backward pass has for it.
pub(crate) struct Saved {
    /// The block's inputs, detached.
    pub xs: Vec<Tensor>,
    /// The block's output.
    pub out: Tensor,
    /// The maps inside the block that its forward handed over to keep, in the order it gave
    /// them; empty under activation checkpointing, where the backward pass recomputes them.
    pub inside: Vec<Tensor>,
}

impl Saved {
    /// The kept maps inside the block if there are `N`, else `recompute()`.
    pub fn inside_or<const N: usize>(
        &mut self,
        recompute: impl FnOnce(&[Tensor]) -> Result<[Tensor; N]>,
    ) -> Result<[Tensor; N]> {
        match <[Tensor; N]>::try_from(std::mem::take(&mut self.inside)) {
            Ok(kept) => Ok(kept),
            Err(_) => recompute(&self.xs),
        }
    }
}

/// What a [`HandBackward`] returns: the inputs' gradients and (parameter, gradient) pairs.
pub(crate) type HandGrads = (Vec<Option<Tensor>>, Vec<(Tensor, Tensor)>);

/// The error of a hand-written backward pass of `block` when a layer's kernels do not serve
/// it after all (its forward checked that they do).
pub(crate) fn unserved(kernels: cpu_ops::Kernels, block: &str) -> crate::Error {
    crate::Error::Config {
        option: "kernels",
        value: kernels.name().into(),
        problem: format!("{block}'s hand-written backward pass needs the CPU kernels"),
    }
}

/// `forward(xs)` (one or two inputs) with its backward pass `backward`, written by hand: the
/// op keeps the block's inputs, its output and, in a plain training forward, the maps inside
/// the block that `forward` hands over, instead of the graph that candle's autograd would keep
/// of every layer and the gradients it would hold to the end. Given `stash` (activation
/// checkpointing) it keeps the inputs and the output only, and `backward` recomputes the rest,
/// freeing each tensor when it is past it. Where a graph is recorded this needs a stash,
/// `stash` or else the segments' (set in every training forward but under
/// [`PlainAutograd`]); without one it returns `None` and the caller composes the block for
/// candle's autograd. Without a graph `forward` simply runs.
pub(crate) fn by_hand(
    xs: &[&Tensor],
    stash: Option<&Stash>,
    forward: impl Fn(&[Tensor]) -> Result<(Tensor, Vec<Tensor>)> + Send + Sync + 'static,
    backward: Arc<HandBackward>,
) -> Result<Option<Tensor>> {
    let keep_inside = stash.is_none();
    let stash = match stash {
        Some(s) => Some(s.clone()),
        None => SEGMENTS.with(|s| s.borrow().clone()),
    };
    match stash {
        Some(stash) if GradMode::on() && !recomputing() => {
            let (y, inside) = without_graph(xs, |d| forward(d))?;
            let inside = if keep_inside { inside } else { Vec::new() };
            let backward = Backward::ByHand(backward, Mutex::new(inside));
            apply(xs, &stash, y, backward).map(Some)
        }
        _ if GradMode::on() => Ok(None),
        _ => {
            let xs: Vec<Tensor> = xs.iter().map(|&x| x.clone()).collect();
            forward(&xs).map(|(y, _)| Some(y))
        }
    }
}

fn run(xs: &[&Tensor], stash: &Stash, f: Arc<Block>) -> Result<Tensor> {
    let y = without_graph(xs, |d| f(d))?;
    apply(xs, stash, y, Backward::Recompute(f))
}

/// `f` of the detached inputs, recording no graph.
fn without_graph<T>(xs: &[&Tensor], f: impl FnOnce(&[Tensor]) -> Result<T>) -> Result<T> {
    let _no_graph = GradMode::set(false);
    let detached: Vec<Tensor> = xs.iter().map(|x| x.detach()).collect();
    f(&detached)
}

/// The checkpoint op on `xs` with the block's output `y`, computed without a graph.
fn apply(xs: &[&Tensor], stash: &Stash, y: Tensor, backward: Backward) -> Result<Tensor> {
    // The op's forward copies the output's buffer, which must be the output alone.
    let out = match whole_cpu_buffer(&y) {
        true => y,
        false => y.force_contiguous()?,
    };
    let op = Recompute {
        backward,
        out: Mutex::new(Some(out)),
        two: xs.len() == 2,
        stash: stash.clone(),
        dtype: compute_dtype(),
    };
    // The op's arguments are the inputs (the second repeats the anchor for one input) and the
    // anchor; its output is a copy of `out`.
    let second = xs.get(1).copied().unwrap_or(&stash.anchor);
    Ok(xs[0].apply_op3(second, &stash.anchor, op)?)
}

/// How a checkpoint op takes its gradients.
enum Backward {
    /// Recompute the block under autograd and differentiate it.
    Recompute(Arc<Block>),
    /// The block's hand-written backward pass, with the maps inside it that the forward kept
    /// (taken, and so freed, by the backward pass).
    ByHand(Arc<HandBackward>, Mutex<Vec<Tensor>>),
}

struct Recompute {
    backward: Backward,
    /// The block's output, computed without a graph; taken (and freed) once copied.
    out: Mutex<Option<Tensor>>,
    two: bool,
    stash: Stash,
    dtype: DType,
}

/// Floats in a CPU storage of a float dtype.
fn cpu_len(y: &CpuStorage) -> candle_core::Result<usize> {
    Ok(match y {
        CpuStorage::F32(v) => v.len(),
        CpuStorage::BF16(v) => v.len(),
        CpuStorage::F16(v) => v.len(),
        CpuStorage::F64(v) => v.len(),
        _ => candle_core::bail!("checkpoint: not a float tensor"),
    })
}

/// Whether `t` is a CPU tensor that is all of its buffer, contiguous from its start.
fn whole_cpu_buffer(t: &Tensor) -> bool {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(y) => cpu_len(y).is_ok_and(|len| whole(layout, len).is_ok()),
        _ => false,
    }
}

fn whole(layout: &Layout, len: usize) -> candle_core::Result<()> {
    match layout.contiguous_offsets() {
        Some((0, end)) if end == len => Ok(()),
        _ => Err(candle_core::Error::Msg(
            "checkpoint: the block's output is not one contiguous buffer".into(),
        )),
    }
}

impl Recompute {
    /// The op's gradients from a hand-written backward pass's: the parameters' go to the
    /// stash (added to any there), the inputs' are returned.
    #[allow(clippy::type_complexity)]
    fn by_hand_grads(
        &self,
        mut g: Vec<Option<Tensor>>,
        params: Vec<(Tensor, Tensor)>,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mut stash = self.stash.lock();
        for (param, gp) in params {
            if !param.is_variable() {
                continue;
            }
            let gp = match stash.get(&param) {
                Some(old) => (old + gp)?,
                None => gp,
            };
            stash.insert(&param, gp);
        }
        drop(stash);
        g.resize(2, None);
        let gb = if self.two { g.pop().flatten() } else { None };
        let ga = g.into_iter().next().flatten();
        Ok((ga, gb, None))
    }

    fn take_out(&self) -> candle_core::Result<Tensor> {
        self.out
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| candle_core::Error::Msg("checkpoint: the op ran twice".into()))
    }
}

impl CustomOp3 for Recompute {
    fn name(&self) -> &'static str {
        "checkpoint"
    }

    /// The output: a copy of the block's output computed without a graph.
    fn cpu_fwd(
        &self,
        _a: &CpuStorage,
        _al: &Layout,
        _b: &CpuStorage,
        _bl: &Layout,
        _anchor: &CpuStorage,
        _anl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = self.take_out()?;
        let (storage, layout) = out.storage_and_layout();
        let Storage::Cpu(y) = &*storage else {
            candle_core::bail!("checkpoint: the block's output is not on the CPU");
        };
        whole(layout, cpu_len(y)?)?;
        Ok((y.clone(), layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _a: &candle_core::CudaStorage,
        _al: &Layout,
        _b: &candle_core::CudaStorage,
        _bl: &Layout,
        _anchor: &candle_core::CudaStorage,
        _anl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let out = self.take_out()?;
        let (storage, layout) = out.storage_and_layout();
        let Storage::Cuda(y) = &*storage else {
            candle_core::bail!("checkpoint: the block's output is not on the GPU");
        };
        Ok((y.try_clone(layout)?, layout.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _anchor: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let f = match &self.backward {
            Backward::Recompute(f) => f,
            Backward::ByHand(backward, inside) => {
                let _graph = GradMode::set(false);
                let _recomputing = Recomputing::enter();
                let _dtype = Autocast::new(self.dtype).map_err(candle_core::Error::wrap)?;
                let mut xs = vec![a.detach()];
                if self.two {
                    xs.push(b.detach());
                }
                let inside = std::mem::take(&mut *inside.lock().unwrap_or_else(|e| e.into_inner()));
                let saved = Saved {
                    xs,
                    out: res.detach(),
                    inside,
                };
                let (g, params) = backward(saved, grad).map_err(candle_core::Error::wrap)?;
                return self.by_hand_grads(g, params);
            }
        };
        let _graph = GradMode::set(true);
        let _recomputing = Recomputing::enter();
        let _dtype = Autocast::new(self.dtype).map_err(candle_core::Error::wrap)?;
        let mut inputs = vec![Var::from_tensor(&a.detach())?];
        if self.two {
            inputs.push(Var::from_tensor(&b.detach())?);
        }
        let xs: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&xs).map_err(candle_core::Error::wrap)?;
        let mut grads = seeded_backward(&y, grad)?;
        let mut g: Vec<Option<Tensor>> = inputs
            .iter()
            .map(|v| grads.remove(v.as_tensor()).map(|g| g.detach()))
            .collect();
        self.stash.lock().extend(detached(grads))?;
        let gb = if self.two { g.pop().flatten() } else { None };
        let ga = g.pop().flatten();
        Ok((ga, gb, None))
    }
}

/// The gradients of everything `y` depends on, given `grad`, the gradient of a scalar loss
/// with respect to `y`: `backward` seeded with `grad` instead of ones.
///
/// The obvious `(y · grad).sum_all().backward()` holds the product, and candle also computes
/// the product's gradient with respect to `grad` and keeps it to the end of the pass: two
/// more tensors of `y`'s size, which at a decoder's full resolution were gigabytes at the
/// peak of the step.
fn seeded_backward(y: &Tensor, grad: &Tensor) -> candle_core::Result<GradStore> {
    y.apply_op1(Seed(grad.detach()))?.backward()
}

/// A scalar (zero) whose gradient with respect to its argument is the tensor it holds.
struct Seed(Tensor);

impl CustomOp1 for Seed {
    fn name(&self) -> &'static str {
        "seed"
    }

    fn cpu_fwd(&self, s: &CpuStorage, _l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        use candle_core::backend::{BackendDevice, BackendStorage};
        let zero = candle_core::cpu_backend::CpuDevice.zeros_impl(&Shape::from(()), s.dtype())?;
        Ok((zero, Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        _l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::{BackendDevice, BackendStorage};
        let zero = s.device().zeros_impl(&Shape::from(()), s.dtype())?;
        Ok((zero, Shape::from(())))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        _grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        if arg.shape() != self.0.shape() {
            candle_core::bail!(
                "checkpoint: gradient of shape {:?} for an output of shape {:?}",
                self.0.shape(),
                arg.shape()
            );
        }
        Ok(Some(self.0.to_dtype(arg.dtype())?))
    }
}

/// `f(block, x)`, checkpointed when `stash` is given.
pub(crate) fn maybe<B: Clone + Send + Sync + 'static>(
    x: &Tensor,
    stash: Option<&Stash>,
    block: &B,
    f: fn(&B, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    match stash {
        None => f(block, x),
        Some(stash) => {
            let block = block.clone();
            checkpoint(x, stash, move |x| f(&block, x))
        }
    }
}

thread_local! {
    static SEGMENTS: RefCell<Option<Stash>> = const { RefCell::new(None) };
    static RECOMPUTING: Cell<bool> = const { Cell::new(false) };
    static PLAIN: Cell<bool> = const { Cell::new(false) };
}

/// While alive, training forwards on this thread use no [`segment`]s and, unless activation
/// checkpointing is on, no blocks with hand-written backward passes ([`by_hand`]): every
/// composed op keeps its intermediates for the backward pass, as candle's autograd does by
/// itself. For measuring what these save and for checking that they change no gradient.
pub struct PlainAutograd(bool);

impl PlainAutograd {
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        PlainAutograd(PLAIN.with(|p| p.replace(true)))
    }
}

impl Drop for PlainAutograd {
    fn drop(&mut self) {
        PLAIN.with(|p| p.set(self.0));
    }
}

/// While alive, [`segment`]s on this thread are checkpointed into `stash` (set by the model's
/// training forward).
pub(crate) struct Segments(Option<Stash>);

impl Segments {
    pub(crate) fn set(stash: Option<Stash>) -> Self {
        let stash = stash.filter(|_| !PLAIN.with(|p| p.get()));
        Segments(SEGMENTS.with(|s| s.replace(stash)))
    }
}

impl Drop for Segments {
    fn drop(&mut self) {
        let previous = self.0.take();
        SEGMENTS.with(|s| *s.borrow_mut() = previous);
    }
}

struct Recomputing(bool);

impl Recomputing {
    fn enter() -> Self {
        Recomputing(RECOMPUTING.with(|r| r.replace(true)))
    }
}

impl Drop for Recomputing {
    fn drop(&mut self) {
        RECOMPUTING.with(|r| r.set(self.0));
    }
}

/// Whether the backward pass is recomputing a checkpointed forward: state updates (BatchNorm's
/// running statistics) were made by the first run and are skipped.
pub(crate) fn recomputing() -> bool {
    RECOMPUTING.with(|r| r.get())
}

/// `f(x)`, kept as input and output only when a training forward records a graph (recomputed
/// in the backward pass; not again inside a recomputation), plain otherwise.
pub(crate) fn segment(
    x: &Tensor,
    f: impl Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    let stash = SEGMENTS.with(|s| s.borrow().clone());
    match stash {
        Some(stash) if GradMode::on() && !recomputing() => checkpoint(x, &stash, f),
        _ => f(x),
    }
}

/// A function called with each stage's kind.
pub type StageHook = Box<dyn FnMut(&'static str, Mark)>;

/// What a stage hook is told at a mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// The end of a stage (a layer, a decoder level, …).
    Stage,
    /// The end of a part inside a stage (a layer's projections, its attention, …), for
    /// profiles finer than the stages; memory accounting by stage ignores these.
    Detail,
}

/// `f(block, a, b)` (`a` and `b` concatenated inside `f`, which a checkpoint then does not
/// keep either), checkpointed when `stash` is given.
pub(crate) fn maybe2<B: Clone + Send + Sync + 'static>(
    a: &Tensor,
    b: &Tensor,
    stash: Option<&Stash>,
    block: &B,
    f: fn(&B, &Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    match stash {
        None => f(block, a, b),
        Some(stash) => {
            let block = block.clone();
            checkpoint2(a, b, stash, move |a, b| f(&block, a, b))
        }
    }
}

thread_local! {
    static STAGE_HOOK: RefCell<Option<StageHook>> = const { RefCell::new(None) };
}

/// Installs (or with `None` removes) a function that the forward passes of this thread call at
/// the end of each stage with the stage's kind ("Mamba layer", "decoder: conv block", …), for
/// benchmarks that attribute memory or time to layer kinds. Returns the previous hook.
pub fn set_stage_hook(hook: Option<StageHook>) -> Option<StageHook> {
    STAGE_HOOK.with(|h| std::mem::replace(&mut *h.borrow_mut(), hook))
}

/// Marks the end of a stage of kind `kind`.
pub(crate) fn stage(kind: &'static str) {
    mark(kind, Mark::Stage);
}

/// Marks the end of a part of kind `kind` inside a stage.
pub(crate) fn detail(kind: &'static str) {
    mark(kind, Mark::Detail);
}

fn mark(kind: &'static str, what: Mark) {
    STAGE_HOOK.with(|h| {
        if let Ok(mut h) = h.try_borrow_mut() {
            if let Some(f) = h.as_mut() {
                f(kind, what);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use super::*;

    /// A checkpointed function whose output is a view into a larger buffer (here a narrow of
    /// its result): the op copies the view's values and gives the plain output and gradient.
    #[test]
    fn a_checkpointed_view_gives_the_plain_output_and_gradient() {
        let dev = Device::Cpu;
        let x = Var::new(&[[1f32, 2., 3.], [4., 5., 6.]], &dev).unwrap();
        let anchor = Var::new(&[0f32], &dev).unwrap();
        let stash = Stash::new(anchor.as_tensor().clone());
        let f = |x: &Tensor| Ok(x.sqr()?.narrow(1, 1, 2)?);
        let y = checkpoint(x.as_tensor(), &stash, f).unwrap();
        let plain = f(x.as_tensor()).unwrap();
        let values = |t: &Tensor| t.to_vec2::<f32>().unwrap();
        assert_eq!(values(&y), values(&plain));
        let g = y.sum_all().unwrap().backward().unwrap();
        let want = [[0f32, 4., 6.], [0., 10., 12.]];
        assert_eq!(values(g.get(x.as_tensor()).unwrap()), want);
    }
}
