//! `torch.optim.Adam` and `torch.optim.AdamW` (Adam with decoupled weight decay), with AMSGrad.

use crate::hyper::HyperReader;
use crate::kernel::{lerp, maximum, Algorithm, Driver, Elementwise, StepState};
use crate::{HyperValue, Hyperparameters, OptimError};

const ADAM: &[&str] = &[
    "lr",
    "betas",
    "eps",
    "weight_decay",
    "amsgrad",
    "maximize",
    "decoupled_weight_decay",
];
const ADAMW: &[&str] = &["lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"];

/// `torch.optim.Adam` over flat buffers.
pub type Adam = Elementwise<AdamAlgo>;
/// `torch.optim.AdamW` over flat buffers.
pub type AdamW = Elementwise<AdamWAlgo>;

/// Adam's hyperparameters (torch's `_single_tensor_adam`).
#[derive(Debug, Clone)]
pub struct AdamAlgo {
    name: &'static str,
    lr: f64,
    betas: (f64, f64),
    eps: f64,
    weight_decay: f64,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
}

/// Per-step scalars of Adam.
#[derive(Debug, Clone, Copy)]
pub struct AdamScalars {
    /// `-lr / (1 - beta1^t)`.
    neg_step_size: f32,
    /// `sqrt(1 - beta2^t)`.
    bc2_sqrt: f32,
}

impl AdamAlgo {
    fn parse(
        name: &'static str,
        accepted: &'static [&'static str],
        hyper: &Hyperparameters,
        wd_default: f64,
        decoupled_default: bool,
    ) -> Result<Self, OptimError> {
        let r = HyperReader::new(name, hyper, accepted)?;
        let decoupled_weight_decay = if accepted.contains(&"decoupled_weight_decay") {
            r.flag("decoupled_weight_decay", decoupled_default)?
        } else {
            decoupled_default
        };
        let a = AdamAlgo {
            name,
            lr: r.float("lr", 1e-3)?,
            betas: r.pair("betas", (0.9, 0.999))?,
            eps: r.float("eps", 1e-8)?,
            weight_decay: r.float("weight_decay", wd_default)?,
            amsgrad: r.flag("amsgrad", false)?,
            maximize: r.flag("maximize", false)?,
            decoupled_weight_decay,
        };
        r.nonneg("lr", a.lr)?;
        r.nonneg("eps", a.eps)?;
        r.beta("betas[0]", a.betas.0)?;
        r.beta("betas[1]", a.betas.1)?;
        r.nonneg("weight_decay", a.weight_decay)?;
        Ok(a)
    }
}

impl Algorithm for AdamAlgo {
    type Scalars = AdamScalars;

    fn from_hyper(hyper: &Hyperparameters) -> Result<Self, OptimError> {
        Self::parse("Adam", ADAM, hyper, 0.0, false)
    }

    fn name(&self) -> &'static str {
        self.name
    }

    fn hyperparameters(&self) -> Hyperparameters {
        let mut h: Hyperparameters = vec![
            ("lr".into(), HyperValue::Float(self.lr)),
            ("betas".into(), HyperValue::Pair(self.betas.0, self.betas.1)),
            ("eps".into(), HyperValue::Float(self.eps)),
            ("weight_decay".into(), HyperValue::Float(self.weight_decay)),
            ("amsgrad".into(), HyperValue::Bool(self.amsgrad)),
            ("maximize".into(), HyperValue::Bool(self.maximize)),
        ];
        if self.name == "Adam" {
            h.push((
                "decoupled_weight_decay".into(),
                HyperValue::Bool(self.decoupled_weight_decay),
            ));
        }
        h
    }

    fn buffers(&self) -> Vec<(&'static str, f32)> {
        let mut b = vec![("exp_avg", 0.0), ("exp_avg_sq", 0.0)];
        if self.amsgrad {
            b.push(("max_exp_avg_sq", 0.0));
        }
        b
    }

    fn begin_step(&self, st: &mut StepState) -> AdamScalars {
        st.step += 1;
        let t = st.step as f64;
        let bc1 = 1.0 - self.betas.0.powf(t);
        let bc2 = 1.0 - self.betas.1.powf(t);
        let step_size = self.lr / bc1;
        AdamScalars {
            neg_step_size: (-step_size) as f32,
            bc2_sqrt: bc2.powf(0.5) as f32,
        }
    }

    fn apply<D: Driver>(&self, sc: AdamScalars, d: D) {
        let maximize = self.maximize;
        let use_wd = self.weight_decay != 0.0;
        let decoupled = self.decoupled_weight_decay;
        let wd = self.weight_decay as f32;
        let decay = (1.0 - self.lr * self.weight_decay) as f32;
        let w1 = (1.0 - self.betas.0) as f32;
        let b2 = self.betas.1 as f32;
        let w2 = (1.0 - self.betas.1) as f32;
        let eps = self.eps as f32;
        let moments = move |p: f32, g: f32, m: f32, v: f32| {
            let mut p = p;
            let mut g = if maximize { -g } else { g };
            if use_wd {
                if decoupled {
                    p *= decay;
                } else {
                    g += wd * p;
                }
            }
            (p, lerp(m, g, w1), v * b2 + w2 * g * g)
        };
        let update =
            move |p: f32, m: f32, v: f32| p + sc.neg_step_size * m / (v.sqrt() / sc.bc2_sqrt + eps);
        if self.amsgrad {
            d.run(move |p, g, [m, v, vmax]| {
                let (p, m, v) = moments(p, g, m, v);
                let vmax = maximum(vmax, v);
                (update(p, m, vmax), [m, v, vmax])
            });
        } else {
            d.run(move |p, g, [m, v]| {
                let (p, m, v) = moments(p, g, m, v);
                (update(p, m, v), [m, v])
            });
        }
    }
}

/// AdamW: Adam with decoupled weight decay (default `weight_decay=1e-2`).
#[derive(Debug, Clone)]
pub struct AdamWAlgo(AdamAlgo);

impl Algorithm for AdamWAlgo {
    type Scalars = AdamScalars;

    fn from_hyper(hyper: &Hyperparameters) -> Result<Self, OptimError> {
        AdamAlgo::parse("AdamW", ADAMW, hyper, 1e-2, true).map(AdamWAlgo)
    }
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn hyperparameters(&self) -> Hyperparameters {
        self.0.hyperparameters()
    }
    fn buffers(&self) -> Vec<(&'static str, f32)> {
        self.0.buffers()
    }
    fn begin_step(&self, st: &mut StepState) -> AdamScalars {
        self.0.begin_step(st)
    }
    fn apply<D: Driver>(&self, sc: AdamScalars, d: D) {
        self.0.apply(sc, d)
    }
}
