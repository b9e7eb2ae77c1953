//! The CPU kernels against the sequential f64 reference and against central finite differences.

use vim_scan::{cpu, reference, ScanInputs, ScanShape};

/// Owned random inputs; optional ones present according to the flags.
struct Case<F> {
    shape: ScanShape,
    u: Vec<F>,
    delta: Vec<F>,
    a: Vec<F>,
    b: Vec<F>,
    c: Vec<F>,
    d: Option<Vec<F>>,
    z: Option<Vec<F>>,
    bias: Option<Vec<F>>,
    softplus: bool,
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
    fn vec(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f64> {
        (0..n).map(|_| lo + (hi - lo) * self.next()).collect()
    }
}

#[derive(Clone, Copy)]
struct Options {
    d: bool,
    z: bool,
    bias: bool,
    softplus: bool,
}

fn case(shape: ScanShape, o: Options, seed: u64) -> Case<f64> {
    let mut r = Rng(seed);
    let ScanShape {
        batch,
        channels,
        state,
        length,
    } = shape;
    let rows = batch * channels * length;
    Case {
        shape,
        u: r.vec(rows, -1.0, 1.0),
        // Without softplus delta must be positive, as softplus would make it.
        delta: if o.softplus {
            r.vec(rows, -3.0, 1.0)
        } else {
            r.vec(rows, 0.01, 0.5)
        },
        a: r.vec(channels * state, -2.0, -0.1),
        b: r.vec(batch * state * length, -1.0, 1.0),
        c: r.vec(batch * state * length, -1.0, 1.0),
        d: o.d.then(|| r.vec(channels, -1.0, 1.0)),
        z: o.z.then(|| r.vec(rows, -2.0, 2.0)),
        bias: o.bias.then(|| r.vec(channels, -0.5, 0.5)),
        softplus: o.softplus,
    }
}

impl<F: vim_scan::Float> Case<F> {
    fn inputs(&self) -> ScanInputs<'_, F> {
        ScanInputs {
            u: &self.u,
            delta: &self.delta,
            a: &self.a,
            b: &self.b,
            c: &self.c,
            d: self.d.as_deref(),
            z: self.z.as_deref(),
            delta_bias: self.bias.as_deref(),
            delta_softplus: self.softplus,
            reverse: false,
        }
    }

    /// The case with every (…, L) input reversed along L.
    fn flipped(&self) -> Case<F> {
        let l = self.shape.length;
        let f = |v: &Vec<F>| flip_rows(v, l);
        Case {
            shape: self.shape,
            u: f(&self.u),
            delta: f(&self.delta),
            a: self.a.clone(),
            b: f(&self.b),
            c: f(&self.c),
            d: self.d.clone(),
            z: self.z.as_ref().map(f),
            bias: self.bias.clone(),
            softplus: self.softplus,
        }
    }
}

/// Each length-`l` row of `v` reversed.
fn flip_rows<F: Copy>(v: &[F], l: usize) -> Vec<F> {
    v.chunks(l)
        .flat_map(|row| row.iter().rev().copied())
        .collect()
}

impl Case<f64> {
    fn to_f32(&self) -> Case<f32> {
        let f = |v: &Vec<f64>| v.iter().map(|x| *x as f32).collect::<Vec<f32>>();
        Case {
            shape: self.shape,
            u: f(&self.u),
            delta: f(&self.delta),
            a: f(&self.a),
            b: f(&self.b),
            c: f(&self.c),
            d: self.d.as_ref().map(f),
            z: self.z.as_ref().map(f),
            bias: self.bias.as_ref().map(f),
            softplus: self.softplus,
        }
    }
}

fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
    a.iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

fn shapes() -> Vec<(ScanShape, Options)> {
    let all = Options {
        d: true,
        z: true,
        bias: true,
        softplus: true,
    };
    let none = Options {
        d: false,
        z: false,
        bias: false,
        softplus: false,
    };
    vec![
        (
            ScanShape {
                batch: 1,
                channels: 3,
                state: 16,
                length: 1,
            },
            all,
        ),
        (
            ScanShape {
                batch: 2,
                channels: 5,
                state: 1,
                length: 9,
            },
            none,
        ),
        (
            ScanShape {
                batch: 2,
                channels: 4,
                state: 16,
                length: 300,
            },
            all,
        ), // 300 = 256 + 44
        (
            ScanShape {
                batch: 1,
                channels: 6,
                state: 4,
                length: 513,
            },
            Options { z: false, ..all },
        ),
        (
            ScanShape {
                batch: 1,
                channels: 2,
                state: 16,
                length: 257,
            },
            Options {
                softplus: false,
                bias: false,
                ..all
            },
        ),
        (
            ScanShape {
                batch: 3,
                channels: 2,
                state: 2,
                length: 40,
            },
            Options { d: false, ..all },
        ),
        // The fixed-size N = 8 path.
        (
            ScanShape {
                batch: 1,
                channels: 3,
                state: 8,
                length: 270,
            },
            Options { z: false, ..all },
        ),
    ]
}

#[test]
fn forward_f32_agrees_with_the_f64_reference() {
    for (i, (shape, o)) in shapes().into_iter().enumerate() {
        let c64 = case(shape, o, 100 + i as u64);
        let c32 = c64.to_f32();
        let reference = reference::selective_scan(shape, &c64.inputs()).unwrap();
        let ours: Vec<f64> = cpu::forward(shape, &c32.inputs())
            .unwrap()
            .y
            .iter()
            .map(|v| f64::from(*v))
            .collect();
        let err = max_rel(&ours, &reference);
        assert!(err < 1e-5, "case {i} {shape:?}: {err:e}");
        let ours64 = cpu::forward(shape, &c64.inputs()).unwrap().y;
        assert!(max_rel(&ours64, &reference) < 1e-13, "case {i}: f64 kernel");
    }
}

#[test]
fn the_chunk_length_changes_nothing() {
    let (shape, o) = shapes()[2];
    let c = case(shape, o, 7);
    let grad: Vec<f64> = Rng(9).vec(shape.batch * shape.channels * shape.length, -1.0, 1.0);
    let reference = cpu::forward_chunked(shape, &c.inputs(), 300).unwrap();
    let g_ref = cpu::backward(shape, &c.inputs(), &reference.saved, &grad).unwrap();
    for chunk in [1, 7, 64, 256, 1000] {
        let f = cpu::forward_chunked(shape, &c.inputs(), chunk).unwrap();
        assert_eq!(f.saved.chunks, shape.length.div_ceil(chunk));
        assert!(max_rel(&f.y, &reference.y) < 1e-14);
        let g = cpu::backward(shape, &c.inputs(), &f.saved, &grad).unwrap();
        for (name, x, y) in [
            ("u", &g.u, &g_ref.u),
            ("delta", &g.delta, &g_ref.delta),
            ("A", &g.a, &g_ref.a),
            ("B", &g.b, &g_ref.b),
            ("C", &g.c, &g_ref.c),
        ] {
            assert!(max_rel(x, y) < 1e-12, "chunk {chunk}: {name}");
        }
    }
}

/// loss = Σ y · R; its gradient by central differences at sampled entries of one input.
fn finite_difference(c: &mut Case<f64>, which: &str, index: usize, r: &[f64]) -> f64 {
    let eps = 1e-6;
    let eval = |delta: f64, c: &mut Case<f64>| {
        let slot: &mut Vec<f64> = match which {
            "u" => &mut c.u,
            "delta" => &mut c.delta,
            "A" => &mut c.a,
            "B" => &mut c.b,
            "C" => &mut c.c,
            "D" => c.d.as_mut().unwrap(),
            "z" => c.z.as_mut().unwrap(),
            _ => c.bias.as_mut().unwrap(),
        };
        slot[index] += delta;
        let y = cpu::forward(c.shape, &c.inputs()).unwrap().y;
        let slot: &mut Vec<f64> = match which {
            "u" => &mut c.u,
            "delta" => &mut c.delta,
            "A" => &mut c.a,
            "B" => &mut c.b,
            "C" => &mut c.c,
            "D" => c.d.as_mut().unwrap(),
            "z" => c.z.as_mut().unwrap(),
            _ => c.bias.as_mut().unwrap(),
        };
        slot[index] -= delta;
        y.iter().zip(r).map(|(a, b)| a * b).sum::<f64>()
    };
    (eval(eps, c) - eval(-eps, c)) / (2.0 * eps)
}

#[test]
fn backward_f64_matches_central_finite_differences_for_every_input() {
    for (i, (shape, o)) in shapes().into_iter().enumerate() {
        if shape.length > 300 {
            continue; // finite differences over long sequences are slow; chunking is covered above
        }
        let mut c = case(shape, o, 200 + i as u64);
        let r = Rng(31 + i as u64).vec(shape.batch * shape.channels * shape.length, -1.0, 1.0);
        let f = cpu::forward(shape, &c.inputs()).unwrap();
        let g = cpu::backward(shape, &c.inputs(), &f.saved, &r).unwrap();
        let mut named: Vec<(&str, Vec<f64>)> = vec![
            ("u", g.u),
            ("delta", g.delta),
            ("A", g.a),
            ("B", g.b),
            ("C", g.c),
        ];
        named.extend(g.d.map(|v| ("D", v)));
        named.extend(g.z.map(|v| ("z", v)));
        named.extend(g.delta_bias.map(|v| ("bias", v)));
        let mut rng = Rng(5);
        for (name, grad) in named {
            for _ in 0..6 {
                let k = (rng.next() * grad.len() as f64) as usize;
                let numeric = finite_difference(&mut c, name, k, &r);
                let err = (grad[k] - numeric).abs() / numeric.abs().max(1e-3);
                assert!(
                    err < 1e-6,
                    "case {i} {name}[{k}]: analytic {} numeric {numeric}",
                    grad[k]
                );
            }
        }
    }
}

/// The f32 forward and backward on every kernel path this CPU has (portable, AVX2 + FMA,
/// AVX-512) agree with the f64 pass.
#[test]
fn backward_f32_agrees_with_f64_on_every_kernel_path() {
    use cpu::KernelPath;
    let mut paths = vec![KernelPath::Portable, KernelPath::Avx2, KernelPath::Avx512];
    paths.retain(|p| *p <= KernelPath::best());
    eprintln!("kernel paths of this CPU: {paths:?}");
    for (i, (shape, o)) in shapes().into_iter().enumerate() {
        for &path in &paths {
            let c64 = case(shape, o, 300 + i as u64);
            let c32 = c64.to_f32();
            let r64 = Rng(77).vec(shape.batch * shape.channels * shape.length, -1.0, 1.0);
            let r32: Vec<f32> = r64.iter().map(|v| *v as f32).collect();
            let f64_pass = cpu::forward(shape, &c64.inputs()).unwrap();
            let g64 = cpu::backward(shape, &c64.inputs(), &f64_pass.saved, &r64).unwrap();
            let f32_pass = cpu::forward_on(path, shape, &c32.inputs(), cpu::CHUNK).unwrap();
            let y = f32_pass
                .y
                .iter()
                .map(|v| f64::from(*v))
                .collect::<Vec<f64>>();
            let err = max_rel(&y, &f64_pass.y);
            assert!(err < 1e-5, "case {i} {shape:?} {path:?} y: {err:e}");
            let g32 = cpu::backward_on(path, shape, &c32.inputs(), &f32_pass.saved, &r32).unwrap();
            let up = |v: &[f32]| v.iter().map(|x| f64::from(*x)).collect::<Vec<f64>>();
            let mut pairs = vec![
                ("u", up(&g32.u), g64.u),
                ("delta", up(&g32.delta), g64.delta),
                ("A", up(&g32.a), g64.a),
                ("B", up(&g32.b), g64.b),
                ("C", up(&g32.c), g64.c),
            ];
            if let (Some(a), Some(b)) = (g32.d, g64.d) {
                pairs.push(("D", up(&a), b));
            }
            if let (Some(a), Some(b)) = (g32.z, g64.z) {
                pairs.push(("z", up(&a), b));
            }
            if let (Some(a), Some(b)) = (g32.delta_bias, g64.delta_bias) {
                pairs.push(("bias", up(&a), b));
            }
            for (name, a, b) in pairs {
                let err = max_rel(&a, &b);
                assert!(err < 1e-5, "case {i} {shape:?} {path:?} {name}: {err:e}");
            }
        }
    }
}

/// A reversed scan is the forward scan of the time-reversed inputs, its output and the
/// gradients of every (…, L) input reversed back, on every kernel path; and it agrees with the
/// reversed f64 reference.
#[test]
fn a_reversed_scan_is_the_scan_of_reversed_inputs() {
    use cpu::KernelPath;
    let mut paths = vec![KernelPath::Portable, KernelPath::Avx2, KernelPath::Avx512];
    paths.retain(|p| *p <= KernelPath::best());
    for (i, (shape, o)) in shapes().into_iter().enumerate() {
        let l = shape.length;
        let c64 = case(shape, o, 400 + i as u64);
        let mut reversed = c64.inputs();
        reversed.reverse = true;
        let reference = reference::selective_scan(shape, &reversed).unwrap();
        let flipped = c64.flipped();
        let plain = reference::selective_scan(shape, &flipped.inputs()).unwrap();
        assert!(
            max_rel(&reference, &flip_rows(&plain, l)) < 1e-14,
            "case {i}: reference"
        );
        for &path in &paths {
            let (c32, f32c) = (c64.to_f32(), flipped.to_f32());
            let mut rev = c32.inputs();
            rev.reverse = true;
            let r: Vec<f32> = Rng(50 + i as u64)
                .vec(shape.batch * shape.channels * l, -1.0, 1.0)
                .iter()
                .map(|v| *v as f32)
                .collect();
            let ours = cpu::forward_on(path, shape, &rev, cpu::CHUNK).unwrap();
            let theirs = cpu::forward_on(path, shape, &f32c.inputs(), cpu::CHUNK).unwrap();
            assert_eq!(ours.y, flip_rows(&theirs.y, l), "case {i} {path:?}: y");
            let up = |v: &[f32]| v.iter().map(|x| f64::from(*x)).collect::<Vec<f64>>();
            assert!(
                max_rel(&up(&ours.y), &reference) < 1e-5,
                "case {i} {path:?}"
            );
            let g = cpu::backward_on(path, shape, &rev, &ours.saved, &r).unwrap();
            let gf = cpu::backward_on(
                path,
                shape,
                &f32c.inputs(),
                &theirs.saved,
                &flip_rows(&r, l),
            )
            .unwrap();
            let back = |v: &[f32]| flip_rows(v, l);
            assert_eq!(g.u, back(&gf.u), "case {i} {path:?}: u");
            assert_eq!(g.delta, back(&gf.delta), "case {i} {path:?}: delta");
            assert_eq!(g.b, back(&gf.b), "case {i} {path:?}: B");
            assert_eq!(g.c, back(&gf.c), "case {i} {path:?}: C");
            assert_eq!(g.z.map(|z| back(&z)), gf.z, "case {i} {path:?}: z");
            assert_eq!(g.a, gf.a, "case {i} {path:?}: A");
            assert_eq!(g.d, gf.d, "case {i} {path:?}: D");
            assert_eq!(g.delta_bias, gf.delta_bias, "case {i} {path:?}: bias");
        }
    }
}

#[test]
fn wrong_lengths_are_errors() {
    let shape = ScanShape {
        batch: 1,
        channels: 2,
        state: 3,
        length: 4,
    };
    let c = case(
        shape,
        Options {
            d: true,
            z: true,
            bias: true,
            softplus: true,
        },
        1,
    );
    let mut bad = c.inputs();
    let short = vec![0.0; 3];
    bad.a = &short;
    let err = cpu::forward(shape, &bad).unwrap_err().to_string();
    assert!(err.contains("A has 3 elements, expected 6"), "{err}");
    let f = cpu::forward(shape, &c.inputs()).unwrap();
    assert!(cpu::backward(shape, &c.inputs(), &f.saved, &[0.0; 5]).is_err());
}
