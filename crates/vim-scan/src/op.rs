//! The selective scan as a differentiable candle operation.
//!
//! candle's custom operations take at most three tensors, so the inputs travel packed:
//! `[u; delta; z]` along the batch axis, `[A (flattened); D; delta_bias]` as one vector, and
//! `[B; C]` along the batch axis. Packing with `cat` and unpacking with `narrow` are ordinary
//! differentiable operations, so every input gets its gradient. The backward pass is a second
//! operation applied inside `bwd` on tensors; it recomputes the chunk states from the inputs
//! (mamba's kernel also recomputes rather than store).

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};

use crate::{cpu, Float, ScanInputs, ScanShape};

/// `selective_scan_fn` of mamba_ssm (one group) on candle tensors; see the crate documentation
/// for the equations. Shapes: `u`, `delta`, `z`: (batch, E, L); `a`: (E, N); `b`, `c`:
/// (batch, N, L); `d`, `delta_bias`: (E). f32 or f64 on the CPU, and on CUDA with the `cuda`
/// feature; bf16 and f16 inputs are computed in f32 and the result cast back. The result
/// (batch, E, L) is differentiable with respect to every tensor argument.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use vim_scan::selective_scan;
///
/// let dev = Device::Cpu;
/// let u = Tensor::ones((1, 2, 3), candle_core::DType::F32, &dev)?;
/// let delta = Tensor::full(0.5f32, (1, 2, 3), &dev)?;
/// let a = Tensor::full(-1.0f32, (2, 4), &dev)?;
/// let bc = Tensor::ones((1, 4, 3), candle_core::DType::F32, &dev)?;
/// let y = selective_scan(&u, &delta, &a, &bc, &bc, None, None, None, false)?;
/// assert_eq!(y.dims(), &[1, 2, 3]);
/// # Ok::<(), candle_core::Error>(())
/// ```
///
/// # Errors
/// Shape or dtype mismatches, named; devices other than the CPU and (with `cuda`) CUDA.
#[allow(clippy::too_many_arguments)]
pub fn selective_scan(
    u: &Tensor,
    delta: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    d: Option<&Tensor>,
    z: Option<&Tensor>,
    delta_bias: Option<&Tensor>,
    delta_softplus: bool,
) -> candle_core::Result<Tensor> {
    scan(u, delta, a, b, c, d, z, delta_bias, delta_softplus, false)
}

/// [`selective_scan`] backwards in time (`t` from L − 1 down): equal to flipping `u`, `delta`,
/// `b`, `c` and `z` along L, scanning, and flipping the result back, as the backward direction
/// of a bidirectional Mamba layer does. On the CPU the kernels walk the rows backwards, so none
/// of those copies is made; on CUDA the flips are made around the forward kernel.
///
/// # Errors
/// As [`selective_scan`].
#[allow(clippy::too_many_arguments)]
pub fn selective_scan_reversed(
    u: &Tensor,
    delta: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    d: Option<&Tensor>,
    z: Option<&Tensor>,
    delta_bias: Option<&Tensor>,
    delta_softplus: bool,
) -> candle_core::Result<Tensor> {
    if !u.device().is_cpu() {
        let f = |t: &Tensor| t.flip(&[2]);
        let zf = z.map(f).transpose()?;
        let y = scan(
            &f(u)?,
            &f(delta)?,
            a,
            &f(b)?,
            &f(c)?,
            d,
            zf.as_ref(),
            delta_bias,
            delta_softplus,
            false,
        )?;
        return y.flip(&[2]);
    }
    scan(u, delta, a, b, c, d, z, delta_bias, delta_softplus, true)
}

#[allow(clippy::too_many_arguments)]
fn scan(
    u: &Tensor,
    delta: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    d: Option<&Tensor>,
    z: Option<&Tensor>,
    delta_bias: Option<&Tensor>,
    delta_softplus: bool,
    reverse: bool,
) -> candle_core::Result<Tensor> {
    let (batch, channels, length) = u.dims3()?;
    let (ea, state) = a.dims2()?;
    let expect = |name: &str, t: &Tensor, dims: &[usize]| -> candle_core::Result<()> {
        if t.dims() != dims {
            candle_core::bail!(
                "selective_scan: {name} has shape {:?}, expected {dims:?}",
                t.dims()
            );
        }
        if t.dtype() != u.dtype() {
            candle_core::bail!(
                "selective_scan: {name} is {:?} but u is {:?}",
                t.dtype(),
                u.dtype()
            );
        }
        Ok(())
    };
    if ea != channels {
        candle_core::bail!("selective_scan: A has {ea} rows but u has {channels} channels");
    }
    if matches!(u.dtype(), DType::BF16 | DType::F16) {
        // Half-precision inputs: the scan runs in f32 (exp and the long recurrence need the
        // range and precision) and the result is returned in the input's dtype.
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        let opt = |t: Option<&Tensor>| t.map(f).transpose();
        let (d32, z32, bias32) = (opt(d)?, opt(z)?, opt(delta_bias)?);
        return scan(
            &f(u)?,
            &f(delta)?,
            &f(a)?,
            &f(b)?,
            &f(c)?,
            d32.as_ref(),
            z32.as_ref(),
            bias32.as_ref(),
            delta_softplus,
            reverse,
        )?
        .to_dtype(u.dtype());
    }
    if !matches!(u.dtype(), DType::F32 | DType::F64) {
        candle_core::bail!(
            "selective_scan: dtype {:?} is not supported (f32, f64, or bf16/f16 computed in f32)",
            u.dtype()
        );
    }
    expect("delta", delta, &[batch, channels, length])?;
    expect("A", a, &[channels, state])?;
    expect("B", b, &[batch, state, length])?;
    expect("C", c, &[batch, state, length])?;
    if let Some(t) = d {
        expect("D", t, &[channels])?;
    }
    if let Some(t) = z {
        expect("z", t, &[batch, channels, length])?;
    }
    if let Some(t) = delta_bias {
        expect("delta_bias", t, &[channels])?;
    }
    let shape = ScanShape {
        batch,
        channels,
        state,
        length,
    };
    let all = [
        Some(u),
        Some(delta),
        Some(a),
        Some(b),
        Some(c),
        d,
        z,
        delta_bias,
    ];
    if u.device().is_cpu() && !all.iter().flatten().any(|t| t.track_op()) {
        // Nothing to differentiate (inference): the kernels read the tensors where they lie,
        // with none of the packing copies.
        return untracked(shape, all, delta_softplus, reverse);
    }
    let mut rows = vec![u.clone(), delta.clone()];
    rows.extend(z.cloned());
    let mut params = vec![a.flatten_all()?];
    params.extend(d.cloned());
    params.extend(delta_bias.cloned());
    let x1 = Tensor::cat(&rows, 0)?.contiguous()?;
    let x2 = Tensor::cat(&params, 0)?.contiguous()?;
    let x3 = Tensor::cat(&[b, c], 0)?.contiguous()?;
    let op = ScanOp {
        shape,
        has_d: d.is_some(),
        has_z: z.is_some(),
        has_bias: delta_bias.is_some(),
        delta_softplus,
        reverse,
    };
    x1.apply_op3(&x2, &x3, op)
}

/// The forward pass on the CPU straight from the tensors' storages, for inputs no gradient is
/// tracked through. `all`: u, delta, A, B, C, D, z, delta_bias.
fn untracked(
    shape: ScanShape,
    all: [Option<&Tensor>; 8],
    delta_softplus: bool,
    reverse: bool,
) -> candle_core::Result<Tensor> {
    let tensors: Vec<Option<Tensor>> = all
        .iter()
        .map(|t| t.map(Tensor::contiguous).transpose())
        .collect::<candle_core::Result<_>>()?;
    let guards: Vec<_> = tensors
        .iter()
        .map(|t| t.as_ref().map(Tensor::storage_and_layout))
        .collect();
    fn run<F: Float + candle_core::WithDType, G: std::ops::Deref<Target = candle_core::Storage>>(
        shape: ScanShape,
        guards: &[Option<(G, &Layout)>],
        delta_softplus: bool,
        reverse: bool,
    ) -> candle_core::Result<Vec<F>> {
        let part = |i: usize| -> candle_core::Result<Option<&[F]>> {
            guards[i]
                .as_ref()
                .map(|(st, l)| match &**st {
                    candle_core::Storage::Cpu(cs) => slice::<F>(cs, l),
                    _ => candle_core::bail!("selective_scan: inputs must be on one device"),
                })
                .transpose()
        };
        let need = |i: usize| -> candle_core::Result<&[F]> {
            part(i)?.ok_or_else(|| candle_core::Error::Msg("selective_scan: missing input".into()))
        };
        let inputs = ScanInputs {
            u: need(0)?,
            delta: need(1)?,
            a: need(2)?,
            b: need(3)?,
            c: need(4)?,
            d: part(5)?,
            z: part(6)?,
            delta_bias: part(7)?,
            delta_softplus,
            reverse,
        };
        Ok(cpu::forward(shape, &inputs).map_err(wrap)?.y)
    }
    let dims = (shape.batch, shape.channels, shape.length);
    let dev = candle_core::Device::Cpu;
    match all[0].map(Tensor::dtype) {
        Some(DType::F32) => Tensor::from_vec(
            run::<f32, _>(shape, &guards, delta_softplus, reverse)?,
            dims,
            &dev,
        ),
        _ => Tensor::from_vec(
            run::<f64, _>(shape, &guards, delta_softplus, reverse)?,
            dims,
            &dev,
        ),
    }
}

/// The forward operation on packed tensors.
#[derive(Debug, Clone, Copy)]
struct ScanOp {
    shape: ScanShape,
    has_d: bool,
    has_z: bool,
    has_bias: bool,
    delta_softplus: bool,
    reverse: bool,
}

impl ScanOp {
    /// The output's shape, (batch, E, L).
    fn output_shape(&self) -> Shape {
        let ScanShape {
            batch,
            channels,
            length,
            ..
        } = self.shape;
        Shape::from((batch, channels, length))
    }
}

/// Splits the packed slices into the kernel's inputs.
fn unpack<'a, F>(op: &ScanOp, x1: &'a [F], x2: &'a [F], x3: &'a [F]) -> ScanInputs<'a, F> {
    let ScanShape {
        batch,
        channels,
        state,
        length,
    } = op.shape;
    let rows = batch * channels * length;
    let bc = batch * state * length;
    let mut at = channels * state;
    let mut next = |present: bool| {
        present.then(|| {
            let s = &x2[at..at + channels];
            at += channels;
            s
        })
    };
    let d = next(op.has_d);
    let delta_bias = next(op.has_bias);
    ScanInputs {
        u: &x1[..rows],
        delta: &x1[rows..2 * rows],
        a: &x2[..channels * state],
        b: &x3[..bc],
        c: &x3[bc..2 * bc],
        d,
        z: op.has_z.then(|| &x1[2 * rows..3 * rows]),
        delta_bias,
        delta_softplus: op.delta_softplus,
        reverse: op.reverse,
    }
}

fn slice<'a, F: candle_core::WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
) -> candle_core::Result<&'a [F]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&s.as_slice::<F>()?[start..end]),
        None => candle_core::bail!("selective_scan: inputs must be contiguous"),
    }
}

fn wrap(e: crate::Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// A computation on the three packed inputs, in the element type of the storage.
trait PackedKernel {
    fn run<F: Float + candle_core::WithDType>(
        &self,
        x1: &[F],
        x2: &[F],
        x3: &[F],
    ) -> candle_core::Result<Vec<F>>;
}

/// Slices the contiguous storages and runs `kernel` in f32 or f64; returns the flat result.
fn dispatch<K: PackedKernel>(
    kernel: &K,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    (s3, l3): (&CpuStorage, &Layout),
) -> candle_core::Result<(CpuStorage, usize)> {
    fn go<F: Float + candle_core::WithDType, K: PackedKernel>(
        kernel: &K,
        parts: [(&CpuStorage, &Layout); 3],
    ) -> candle_core::Result<Vec<F>> {
        let [a, b, c] = parts;
        kernel.run(
            slice::<F>(a.0, a.1)?,
            slice::<F>(b.0, b.1)?,
            slice::<F>(c.0, c.1)?,
        )
    }
    let parts = [(s1, l1), (s2, l2), (s3, l3)];
    Ok(match s1 {
        CpuStorage::F32(_) => {
            let v = go::<f32, K>(kernel, parts)?;
            let n = v.len();
            (CpuStorage::F32(v), n)
        }
        CpuStorage::F64(_) => {
            let v = go::<f64, K>(kernel, parts)?;
            let n = v.len();
            (CpuStorage::F64(v), n)
        }
        _ => candle_core::bail!("selective_scan: only f32 and f64 are supported"),
    })
}

impl PackedKernel for ScanOp {
    fn run<F: Float + candle_core::WithDType>(
        &self,
        x1: &[F],
        x2: &[F],
        x3: &[F],
    ) -> candle_core::Result<Vec<F>> {
        Ok(cpu::forward(self.shape, &unpack(self, x1, x2, x3))
            .map_err(wrap)?
            .y)
    }
}

impl CustomOp3 for ScanOp {
    fn name(&self) -> &'static str {
        "selective-scan"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (storage, _) = dispatch(self, (s1, l1), (s2, l2), (s3, l3))?;
        Ok((storage, self.output_shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let storage =
            crate::cuda::forward([(s1, l1), (s2, l2), (s3, l3)], self.shape, self.flags())?;
        Ok((storage, self.output_shape()))
    }

    fn bwd(
        &self,
        x1: &Tensor,
        x2: &Tensor,
        x3: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let with_grad = Tensor::cat(&[x1, &grad.contiguous()?], 0)?.contiguous()?;
        let flat = with_grad.apply_op3_no_bwd(x2, x3, &ScanBackwardOp(*self))?;
        let (n1, n2, n3) = (x1.elem_count(), x2.elem_count(), x3.elem_count());
        let g1 = flat.narrow(0, 0, n1)?.reshape(x1.shape())?;
        let g2 = flat.narrow(0, n1, n2)?.reshape(x2.shape())?;
        let g3 = flat.narrow(0, n1 + n2, n3)?.reshape(x3.shape())?;
        Ok((Some(g1), Some(g2), Some(g3)))
    }
}

/// The backward operation: `[x1; grad_y]`, `x2`, `x3` → `[g1 | g2 | g3]` flattened.
struct ScanBackwardOp(ScanOp);

impl PackedKernel for ScanBackwardOp {
    fn run<F: Float + candle_core::WithDType>(
        &self,
        x1g: &[F],
        x2: &[F],
        x3: &[F],
    ) -> candle_core::Result<Vec<F>> {
        let op = &self.0;
        let rows = op.shape.batch * op.shape.channels * op.shape.length;
        let (x1, grad) = x1g.split_at(x1g.len() - rows);
        let inputs = unpack(op, x1, x2, x3);
        let saved = cpu::forward(op.shape, &inputs).map_err(wrap)?.saved;
        let g = cpu::backward(op.shape, &inputs, &saved, grad).map_err(wrap)?;
        // The order of the packing: [u; delta; z], [A; D; delta_bias], [B; C].
        let mut out = Vec::with_capacity(x1.len() + x2.len() + x3.len());
        out.extend(g.u);
        out.extend(g.delta);
        out.extend(g.z.unwrap_or_default());
        out.extend(g.a);
        out.extend(g.d.unwrap_or_default());
        out.extend(g.delta_bias.unwrap_or_default());
        out.extend(g.b);
        out.extend(g.c);
        Ok(out)
    }
}

impl CustomOp3 for ScanBackwardOp {
    fn name(&self) -> &'static str {
        "selective-scan-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (storage, n) = dispatch(self, (s1, l1), (s2, l2), (s3, l3))?;
        Ok((storage, Shape::from(n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (storage, n) =
            crate::cuda::backward([(s1, l1), (s2, l2), (s3, l3)], self.0.shape, self.0.flags())?;
        Ok((storage, Shape::from(n)))
    }
}

#[cfg(feature = "cuda")]
impl ScanOp {
    fn flags(&self) -> crate::cuda::Flags {
        crate::cuda::Flags {
            has_d: self.has_d,
            has_z: self.has_z,
            has_bias: self.has_bias,
            softplus: self.delta_softplus,
        }
    }
}
