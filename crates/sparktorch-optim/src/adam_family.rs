//! `torch.optim.Adamax`, `torch.optim.NAdam` and `torch.optim.RAdam`.

use crate::adaptive::prologue;
use crate::hyper::HyperReader;
use crate::kernel::{lerp, maximum, Algorithm, Driver, Elementwise, StepState};
use crate::{HyperValue, Hyperparameters, OptimError};

/// `torch.optim.Adamax` over flat buffers.
pub type Adamax = Elementwise<AdamaxAlgo>;
/// `torch.optim.NAdam` over flat buffers.
pub type NAdam = Elementwise<NAdamAlgo>;
/// `torch.optim.RAdam` over flat buffers.
pub type RAdam = Elementwise<RAdamAlgo>;

/// The hyperparameters Adamax, NAdam and RAdam share, parsed and checked as torch does.
#[derive(Debug, Clone)]
struct Common {
    lr: f64,
    betas: (f64, f64),
    eps: f64,
    weight_decay: f64,
    maximize: bool,
}

impl Common {
    fn read(r: &HyperReader<'_>, lr: f64) -> Result<Self, OptimError> {
        let c = Common {
            lr: r.float("lr", lr)?,
            betas: r.pair("betas", (0.9, 0.999))?,
            eps: r.float("eps", 1e-8)?,
            weight_decay: r.float("weight_decay", 0.0)?,
            maximize: r.flag("maximize", false)?,
        };
        r.nonneg("lr", c.lr)?;
        r.nonneg("eps", c.eps)?;
        r.beta("betas[0]", c.betas.0)?;
        r.beta("betas[1]", c.betas.1)?;
        r.nonneg("weight_decay", c.weight_decay)?;
        Ok(c)
    }

    fn to_hyper(&self) -> Hyperparameters {
        vec![
            ("lr".into(), HyperValue::Float(self.lr)),
            ("betas".into(), HyperValue::Pair(self.betas.0, self.betas.1)),
            ("eps".into(), HyperValue::Float(self.eps)),
            ("weight_decay".into(), HyperValue::Float(self.weight_decay)),
            ("maximize".into(), HyperValue::Bool(self.maximize)),
        ]
    }

    /// `(maximize, weight decay on, coupled wd as f32, decoupled factor 1 - lr*wd as f32)`.
    fn wd(&self) -> (bool, bool, f32, f32) {
        (
            self.maximize,
            self.weight_decay != 0.0,
            self.weight_decay as f32,
            (1.0 - self.lr * self.weight_decay) as f32,
        )
    }
}

/// `-g` when maximizing; then decoupled (`p *= 1 - lr*wd`) or coupled (`g += wd*p`) decay.
#[inline(always)]
fn decay(p: f32, g: f32, w: (bool, bool, f32, f32), decoupled: bool) -> (f32, f32) {
    let (maximize, use_wd, wd, factor) = w;
    if use_wd && decoupled {
        (p * factor, if maximize { -g } else { g })
    } else {
        (p, prologue(p, g, maximize, use_wd, wd))
    }
}

const ADAMAX: &[&str] = &["lr", "betas", "eps", "weight_decay", "maximize"];

/// Adamax's hyperparameters (torch's `_single_tensor_adamax`).
#[derive(Debug, Clone)]
pub struct AdamaxAlgo(Common);

impl Algorithm for AdamaxAlgo {
    /// `-lr / (1 - beta1^t)`.
    type Scalars = f32;

    fn from_hyper(hyper: &Hyperparameters) -> Result<Self, OptimError> {
        let r = HyperReader::new("Adamax", hyper, ADAMAX)?;
        Ok(AdamaxAlgo(Common::read(&r, 2e-3)?))
    }

    fn name(&self) -> &'static str {
        "Adamax"
    }

    fn hyperparameters(&self) -> Hyperparameters {
        self.0.to_hyper()
    }

    fn buffers(&self) -> Vec<(&'static str, f32)> {
        vec![("exp_avg", 0.0), ("exp_inf", 0.0)]
    }

    fn begin_step(&self, st: &mut StepState) -> f32 {
        st.step += 1;
        let bias_correction = 1.0 - self.0.betas.0.powf(st.step as f64);
        (-(self.0.lr / bias_correction)) as f32
    }

    fn apply<D: Driver>(&self, neg_clr: f32, d: D) {
        let w = self.0.wd();
        let w1 = (1.0 - self.0.betas.0) as f32;
        let b2 = self.0.betas.1 as f32;
        let eps = self.0.eps as f32;
        d.run(move |p, g, [m, u]| {
            let (p, g) = decay(p, g, w, false);
            let m = lerp(m, g, w1);
            let u = maximum(u * b2, g.abs() + eps);
            (p + neg_clr * m / u, [m, u])
        });
    }
}

const NADAM: &[&str] = &[
    "lr",
    "betas",
    "eps",
    "weight_decay",
    "momentum_decay",
    "decoupled_weight_decay",
    "maximize",
];

/// NAdam's hyperparameters (torch's `_single_tensor_nadam`).
#[derive(Debug, Clone)]
pub struct NAdamAlgo {
    c: Common,
    momentum_decay: f64,
    decoupled_weight_decay: bool,
}

/// Per-step scalars of NAdam.
#[derive(Debug, Clone, Copy)]
pub struct NAdamScalars {
    /// `1 - beta2^t`.
    bc2: f32,
    /// `-lr * (1 - mu_t) / (1 - mu_product_t)`.
    c_grad: f32,
    /// `-lr * mu_{t+1} / (1 - mu_product_t * mu_{t+1})`.
    c_avg: f32,
}

impl Algorithm for NAdamAlgo {
    type Scalars = NAdamScalars;

    fn from_hyper(hyper: &Hyperparameters) -> Result<Self, OptimError> {
        let r = HyperReader::new("NAdam", hyper, NADAM)?;
        let c = Common::read(&r, 2e-3)?;
        let momentum_decay = r.float("momentum_decay", 4e-3)?;
        r.nonneg("momentum_decay", momentum_decay)?;
        Ok(NAdamAlgo {
            c,
            momentum_decay,
            decoupled_weight_decay: r.flag("decoupled_weight_decay", false)?,
        })
    }

    fn name(&self) -> &'static str {
        "NAdam"
    }

    fn hyperparameters(&self) -> Hyperparameters {
        let mut h = self.c.to_hyper();
        h.push((
            "momentum_decay".into(),
            HyperValue::Float(self.momentum_decay),
        ));
        h.push((
            "decoupled_weight_decay".into(),
            HyperValue::Bool(self.decoupled_weight_decay),
        ));
        h
    }

    fn buffers(&self) -> Vec<(&'static str, f32)> {
        vec![("exp_avg", 0.0), ("exp_avg_sq", 0.0)]
    }

    fn export_scalars(&self, st: &StepState) -> Vec<(String, f64)> {
        vec![("mu_product".into(), st.mu_product as f64)]
    }

    fn import_scalars(
        &self,
        st: &mut StepState,
        scalars: &[(String, f64)],
    ) -> Result<(), OptimError> {
        let bad = |reason: String| OptimError::BadState {
            optimizer: "NAdam",
            reason,
        };
        if let Some((name, _)) = scalars.iter().find(|(n, _)| n != "mu_product") {
            return Err(bad(format!(
                "unexpected scalar state {name:?} (NAdam keeps mu_product)"
            )));
        }
        match scalars.iter().rev().find(|(n, _)| n == "mu_product") {
            Some(&(_, v)) if v.is_finite() => st.mu_product = v as f32,
            Some(&(_, v)) => return Err(bad(format!("mu_product must be finite, got {v}"))),
            None if st.step == 0 => st.mu_product = 1.0,
            None => return Err(bad("mu_product is missing".into())),
        }
        Ok(())
    }

    fn begin_step(&self, st: &mut StepState) -> NAdamScalars {
        st.step += 1;
        let t = st.step as f64;
        let (b1, b2, lr, md) = (
            self.c.betas.0,
            self.c.betas.1,
            self.c.lr,
            self.momentum_decay,
        );
        let bc2 = 1.0 - b2.powf(t);
        let mu = b1 * (1.0 - 0.5 * 0.96f64.powf(t * md));
        let mu_next = b1 * (1.0 - 0.5 * 0.96f64.powf((t + 1.0) * md));
        // torch keeps mu_product as an f32 tensor: `mu_product *= mu` rounds to f32.
        st.mu_product *= mu as f32;
        let mu_product = st.mu_product as f64;
        let mu_product_next = mu_product * mu_next;
        NAdamScalars {
            bc2: bc2 as f32,
            c_grad: (-lr * (1.0 - mu) / (1.0 - mu_product)) as f32,
            c_avg: ((-lr * mu_next) / (1.0 - mu_product_next)) as f32,
        }
    }

    fn apply<D: Driver>(&self, sc: NAdamScalars, d: D) {
        let w = self.c.wd();
        let decoupled = self.decoupled_weight_decay;
        let w1 = (1.0 - self.c.betas.0) as f32;
        let b2 = self.c.betas.1 as f32;
        let w2 = (1.0 - self.c.betas.1) as f32;
        let eps = self.c.eps as f32;
        d.run(move |p, g, [m, v]| {
            let (p, g) = decay(p, g, w, decoupled);
            let m = lerp(m, g, w1);
            let v = v * b2 + w2 * g * g;
            let denom = (v / sc.bc2).sqrt() + eps;
            let p = p + sc.c_grad * g / denom;
            (p + sc.c_avg * m / denom, [m, v])
        });
    }
}

const RADAM: &[&str] = &[
    "lr",
    "betas",
    "eps",
    "weight_decay",
    "decoupled_weight_decay",
    "maximize",
];

/// RAdam's hyperparameters (torch's `_single_tensor_radam`).
#[derive(Debug, Clone)]
pub struct RAdamAlgo {
    c: Common,
    decoupled_weight_decay: bool,
}

/// Per-step scalars of RAdam.
#[derive(Debug, Clone, Copy)]
pub struct RAdamScalars {
    /// `1 - beta1^t`.
    bc1: f32,
    /// `sqrt(1 - beta2^t)`.
    bc2_sqrt: f32,
    /// The variance rectification term, when the approximated SMA length exceeds 5.
    rect: Option<f32>,
}

impl Algorithm for RAdamAlgo {
    type Scalars = RAdamScalars;

    fn from_hyper(hyper: &Hyperparameters) -> Result<Self, OptimError> {
        let r = HyperReader::new("RAdam", hyper, RADAM)?;
        Ok(RAdamAlgo {
            c: Common::read(&r, 1e-3)?,
            decoupled_weight_decay: r.flag("decoupled_weight_decay", false)?,
        })
    }

    fn name(&self) -> &'static str {
        "RAdam"
    }

    fn hyperparameters(&self) -> Hyperparameters {
        let mut h = self.c.to_hyper();
        h.push((
            "decoupled_weight_decay".into(),
            HyperValue::Bool(self.decoupled_weight_decay),
        ));
        h
    }

    fn buffers(&self) -> Vec<(&'static str, f32)> {
        vec![("exp_avg", 0.0), ("exp_avg_sq", 0.0)]
    }

    fn begin_step(&self, st: &mut StepState) -> RAdamScalars {
        st.step += 1;
        let t = st.step as f64;
        let (b1, b2) = self.c.betas;
        let bc1 = 1.0 - b1.powf(t);
        let bc2 = 1.0 - b2.powf(t);
        let rho_inf = 2.0 / (1.0 - b2) - 1.0;
        let rho_t = rho_inf - 2.0 * t * b2.powf(t) / bc2;
        let rect = (rho_t > 5.0).then(|| {
            ((rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t))
                .powf(0.5) as f32
        });
        RAdamScalars {
            bc1: bc1 as f32,
            bc2_sqrt: bc2.powf(0.5) as f32,
            rect,
        }
    }

    fn apply<D: Driver>(&self, sc: RAdamScalars, d: D) {
        let w = self.c.wd();
        let decoupled = self.decoupled_weight_decay;
        let w1 = (1.0 - self.c.betas.0) as f32;
        let b2 = self.c.betas.1 as f32;
        let w2 = (1.0 - self.c.betas.1) as f32;
        let eps = self.c.eps as f32;
        let lr = self.c.lr as f32;
        let moments = move |p: f32, g: f32, m: f32, v: f32| {
            let (p, g) = decay(p, g, w, decoupled);
            (p, lerp(m, g, w1), v * b2 + w2 * g * g)
        };
        match sc.rect {
            Some(rect) => d.run(move |p, g, [m, v]| {
                let (p, m, v) = moments(p, g, m, v);
                // torch: `bc2_sqrt / (sqrt(v) + eps)` is `reciprocal() * bc2_sqrt`.
                let adaptive = (1.0 / (v.sqrt() + eps)) * sc.bc2_sqrt;
                (p - m / sc.bc1 * lr * adaptive * rect, [m, v])
            }),
            None => d.run(move |p, g, [m, v]| {
                let (p, m, v) = moments(p, g, m, v);
                (p - m / sc.bc1 * lr, [m, v])
            }),
        }
    }
}
