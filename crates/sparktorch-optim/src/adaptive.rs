//! `torch.optim.Adagrad`, `torch.optim.RMSprop` and `torch.optim.Adadelta`.

use crate::hyper::HyperReader;
use crate::kernel::{lerp, Algorithm, Driver, Elementwise, StepState};
use crate::{HyperValue, Hyperparameters, OptimError};

/// `torch.optim.Adagrad` over flat buffers.
pub type Adagrad = Elementwise<AdagradAlgo>;
/// `torch.optim.RMSprop` over flat buffers.
pub type RmsProp = Elementwise<RmsPropAlgo>;
/// `torch.optim.Adadelta` over flat buffers.
pub type Adadelta = Elementwise<AdadeltaAlgo>;

/// `-g` when maximizing, then `g + wd * p` when weight decay is on (torch's common prologue).
#[inline(always)]
pub(crate) fn prologue(p: f32, g: f32, maximize: bool, use_wd: bool, wd: f32) -> f32 {
    let g = if maximize { -g } else { g };
    if use_wd {
        g + wd * p
    } else {
        g
    }
}

const ADAGRAD: &[&str] = &[
    "lr",
    "lr_decay",
    "weight_decay",
    "initial_accumulator_value",
    "eps",
    "maximize",
];

/// Adagrad's hyperparameters (torch's `_single_tensor_adagrad`, dense gradients).
#[derive(Debug, Clone)]
pub struct AdagradAlgo {
    lr: f64,
    lr_decay: f64,
    weight_decay: f64,
    initial_accumulator_value: f64,
    eps: f64,
    maximize: bool,
}

impl Algorithm for AdagradAlgo {
    /// `-lr / (1 + (t - 1) * lr_decay)`.
    type Scalars = f32;

    fn from_hyper(hyper: &Hyperparameters) -> Result<Self, OptimError> {
        let r = HyperReader::new("Adagrad", hyper, ADAGRAD)?;
        let a = AdagradAlgo {
            lr: r.float("lr", 1e-2)?,
            lr_decay: r.float("lr_decay", 0.0)?,
            weight_decay: r.float("weight_decay", 0.0)?,
            initial_accumulator_value: r.float("initial_accumulator_value", 0.0)?,
            eps: r.float("eps", 1e-10)?,
            maximize: r.flag("maximize", false)?,
        };
        r.nonneg("lr", a.lr)?;
        r.nonneg("lr_decay", a.lr_decay)?;
        r.nonneg("weight_decay", a.weight_decay)?;
        r.nonneg("initial_accumulator_value", a.initial_accumulator_value)?;
        r.nonneg("eps", a.eps)?;
        Ok(a)
    }

    fn name(&self) -> &'static str {
        "Adagrad"
    }

    fn hyperparameters(&self) -> Hyperparameters {
        vec![
            ("lr".into(), HyperValue::Float(self.lr)),
            ("lr_decay".into(), HyperValue::Float(self.lr_decay)),
            ("weight_decay".into(), HyperValue::Float(self.weight_decay)),
            (
                "initial_accumulator_value".into(),
                HyperValue::Float(self.initial_accumulator_value),
            ),
            ("eps".into(), HyperValue::Float(self.eps)),
            ("maximize".into(), HyperValue::Bool(self.maximize)),
        ]
    }

    fn buffers(&self) -> Vec<(&'static str, f32)> {
        vec![("sum", self.initial_accumulator_value as f32)]
    }

    fn begin_step(&self, st: &mut StepState) -> f32 {
        st.step += 1;
        let t = st.step as f64;
        let clr = self.lr / (1.0 + (t - 1.0) * self.lr_decay);
        (-clr) as f32
    }

    fn apply<D: Driver>(&self, neg_clr: f32, d: D) {
        let (maximize, use_wd, wd) = (
            self.maximize,
            self.weight_decay != 0.0,
            self.weight_decay as f32,
        );
        let eps = self.eps as f32;
        d.run(move |p, g, [s]| {
            let g = prologue(p, g, maximize, use_wd, wd);
            let s = s + g * g;
            (p + neg_clr * g / (s.sqrt() + eps), [s])
        });
    }
}

const RMSPROP: &[&str] = &[
    "lr",
    "alpha",
    "eps",
    "weight_decay",
    "momentum",
    "centered",
    "maximize",
];

/// RMSprop's hyperparameters (torch's `_single_tensor_rmsprop`).
#[derive(Debug, Clone)]
pub struct RmsPropAlgo {
    lr: f64,
    alpha: f64,
    eps: f64,
    weight_decay: f64,
    momentum: f64,
    centered: bool,
    maximize: bool,
}

impl Algorithm for RmsPropAlgo {
    type Scalars = ();

    fn from_hyper(hyper: &Hyperparameters) -> Result<Self, OptimError> {
        let r = HyperReader::new("RMSprop", hyper, RMSPROP)?;
        let a = RmsPropAlgo {
            lr: r.float("lr", 1e-2)?,
            alpha: r.float("alpha", 0.99)?,
            eps: r.float("eps", 1e-8)?,
            weight_decay: r.float("weight_decay", 0.0)?,
            momentum: r.float("momentum", 0.0)?,
            centered: r.flag("centered", false)?,
            maximize: r.flag("maximize", false)?,
        };
        r.nonneg("lr", a.lr)?;
        r.nonneg("eps", a.eps)?;
        r.nonneg("momentum", a.momentum)?;
        r.nonneg("weight_decay", a.weight_decay)?;
        r.nonneg("alpha", a.alpha)?;
        Ok(a)
    }

    fn name(&self) -> &'static str {
        "RMSprop"
    }

    fn hyperparameters(&self) -> Hyperparameters {
        vec![
            ("lr".into(), HyperValue::Float(self.lr)),
            ("alpha".into(), HyperValue::Float(self.alpha)),
            ("eps".into(), HyperValue::Float(self.eps)),
            ("weight_decay".into(), HyperValue::Float(self.weight_decay)),
            ("momentum".into(), HyperValue::Float(self.momentum)),
            ("centered".into(), HyperValue::Bool(self.centered)),
            ("maximize".into(), HyperValue::Bool(self.maximize)),
        ]
    }

    fn buffers(&self) -> Vec<(&'static str, f32)> {
        let mut b = vec![("square_avg", 0.0)];
        if self.momentum > 0.0 {
            b.push(("momentum_buffer", 0.0));
        }
        if self.centered {
            b.push(("grad_avg", 0.0));
        }
        b
    }

    fn begin_step(&self, st: &mut StepState) {
        st.step += 1;
    }

    fn apply<D: Driver>(&self, _: (), d: D) {
        let (maximize, use_wd, wd) = (
            self.maximize,
            self.weight_decay != 0.0,
            self.weight_decay as f32,
        );
        let alpha = self.alpha as f32;
        let w = (1.0 - self.alpha) as f32;
        let eps = self.eps as f32;
        let neg_lr = (-self.lr) as f32;
        let mom = self.momentum as f32;
        // square_avg update; `avg` from it (and grad_avg when centered).
        let sq = move |sa: f32, g: f32| sa * alpha + w * g * g;
        let plain = move |sa: f32| sa.sqrt() + eps;
        let centered = move |sa: f32, ga: f32| (sa + -ga * ga).sqrt() + eps;
        match (self.momentum > 0.0, self.centered) {
            (false, false) => d.run(move |p, g, [sa]| {
                let g = prologue(p, g, maximize, use_wd, wd);
                let sa = sq(sa, g);
                (p + neg_lr * g / plain(sa), [sa])
            }),
            (true, false) => d.run(move |p, g, [sa, buf]| {
                let g = prologue(p, g, maximize, use_wd, wd);
                let sa = sq(sa, g);
                let buf = buf * mom + g / plain(sa);
                (p + neg_lr * buf, [sa, buf])
            }),
            (false, true) => d.run(move |p, g, [sa, ga]| {
                let g = prologue(p, g, maximize, use_wd, wd);
                let sa = sq(sa, g);
                let ga = lerp(ga, g, w);
                (p + neg_lr * g / centered(sa, ga), [sa, ga])
            }),
            (true, true) => d.run(move |p, g, [sa, buf, ga]| {
                let g = prologue(p, g, maximize, use_wd, wd);
                let sa = sq(sa, g);
                let ga = lerp(ga, g, w);
                let buf = buf * mom + g / centered(sa, ga);
                (p + neg_lr * buf, [sa, buf, ga])
            }),
        }
    }
}

const ADADELTA: &[&str] = &["lr", "rho", "eps", "weight_decay", "maximize"];

/// Adadelta's hyperparameters (torch's `_single_tensor_adadelta`).
#[derive(Debug, Clone)]
pub struct AdadeltaAlgo {
    lr: f64,
    rho: f64,
    eps: f64,
    weight_decay: f64,
    maximize: bool,
}

impl Algorithm for AdadeltaAlgo {
    type Scalars = ();

    fn from_hyper(hyper: &Hyperparameters) -> Result<Self, OptimError> {
        let r = HyperReader::new("Adadelta", hyper, ADADELTA)?;
        let a = AdadeltaAlgo {
            lr: r.float("lr", 1.0)?,
            rho: r.float("rho", 0.9)?,
            eps: r.float("eps", 1e-6)?,
            weight_decay: r.float("weight_decay", 0.0)?,
            maximize: r.flag("maximize", false)?,
        };
        r.nonneg("lr", a.lr)?;
        r.check(
            (0.0..=1.0).contains(&a.rho),
            "rho",
            a.rho,
            "must be in [0, 1]",
        )?;
        r.nonneg("eps", a.eps)?;
        r.nonneg("weight_decay", a.weight_decay)?;
        Ok(a)
    }

    fn name(&self) -> &'static str {
        "Adadelta"
    }

    fn hyperparameters(&self) -> Hyperparameters {
        vec![
            ("lr".into(), HyperValue::Float(self.lr)),
            ("rho".into(), HyperValue::Float(self.rho)),
            ("eps".into(), HyperValue::Float(self.eps)),
            ("weight_decay".into(), HyperValue::Float(self.weight_decay)),
            ("maximize".into(), HyperValue::Bool(self.maximize)),
        ]
    }

    fn buffers(&self) -> Vec<(&'static str, f32)> {
        vec![("square_avg", 0.0), ("acc_delta", 0.0)]
    }

    fn begin_step(&self, st: &mut StepState) {
        st.step += 1;
    }

    fn apply<D: Driver>(&self, _: (), d: D) {
        let (maximize, use_wd, wd) = (
            self.maximize,
            self.weight_decay != 0.0,
            self.weight_decay as f32,
        );
        let rho = self.rho as f32;
        let w = (1.0 - self.rho) as f32;
        let eps = self.eps as f32;
        let neg_lr = (-self.lr) as f32;
        d.run(move |p, g, [sa, ad]| {
            let g = prologue(p, g, maximize, use_wd, wd);
            let sa = sa * rho + w * g * g;
            let std = (sa + eps).sqrt();
            let delta = (ad + eps).sqrt() / std * g;
            let ad = ad * rho + w * delta * delta;
            (p + neg_lr * delta, [sa, ad])
        });
    }
}
