//! `torch.optim.SGD`: momentum, dampening, Nesterov, weight decay, maximize.

use crate::hyper::HyperReader;
use crate::kernel::{Algorithm, Driver, Elementwise, StepState};
use crate::{HyperValue, Hyperparameters, OptimError};

const ACCEPTED: &[&str] = &[
    "lr",
    "momentum",
    "dampening",
    "weight_decay",
    "nesterov",
    "maximize",
];

/// `torch.optim.SGD` over flat buffers.
pub type Sgd = Elementwise<SgdAlgo>;

/// SGD's hyperparameters (torch's `_single_tensor_sgd`).
#[derive(Debug, Clone)]
pub struct SgdAlgo {
    lr: f64,
    momentum: f64,
    dampening: f64,
    weight_decay: f64,
    nesterov: bool,
    maximize: bool,
}

/// Per-step scalars of SGD.
#[derive(Debug, Clone, Copy)]
pub struct SgdScalars {
    /// The first step with momentum: the buffer becomes a copy of the gradient.
    first: bool,
}

impl Algorithm for SgdAlgo {
    type Scalars = SgdScalars;

    fn from_hyper(hyper: &Hyperparameters) -> Result<Self, OptimError> {
        let r = HyperReader::new("SGD", hyper, ACCEPTED)?;
        let a = SgdAlgo {
            lr: r.float("lr", 1e-3)?,
            momentum: r.float("momentum", 0.0)?,
            dampening: r.float("dampening", 0.0)?,
            weight_decay: r.float("weight_decay", 0.0)?,
            nesterov: r.flag("nesterov", false)?,
            maximize: r.flag("maximize", false)?,
        };
        r.nonneg("lr", a.lr)?;
        r.nonneg("momentum", a.momentum)?;
        r.nonneg("weight_decay", a.weight_decay)?;
        r.finite("dampening", a.dampening)?;
        if a.nesterov && (a.momentum <= 0.0 || a.dampening != 0.0) {
            r.check(
                false,
                "nesterov",
                1.0,
                "Nesterov momentum requires a momentum and zero dampening",
            )?;
        }
        Ok(a)
    }

    fn name(&self) -> &'static str {
        "SGD"
    }

    fn hyperparameters(&self) -> Hyperparameters {
        vec![
            ("lr".into(), HyperValue::Float(self.lr)),
            ("momentum".into(), HyperValue::Float(self.momentum)),
            ("dampening".into(), HyperValue::Float(self.dampening)),
            ("weight_decay".into(), HyperValue::Float(self.weight_decay)),
            ("nesterov".into(), HyperValue::Bool(self.nesterov)),
            ("maximize".into(), HyperValue::Bool(self.maximize)),
        ]
    }

    fn buffers(&self) -> Vec<(&'static str, f32)> {
        if self.momentum != 0.0 {
            vec![("momentum_buffer", 0.0)]
        } else {
            Vec::new()
        }
    }

    fn buffers_live(&self, st: &StepState) -> bool {
        st.initialized
    }

    fn lazy_buffers(&self) -> bool {
        true
    }

    fn begin_step(&self, st: &mut StepState) -> SgdScalars {
        st.step += 1;
        let first = !st.initialized;
        st.initialized = true;
        SgdScalars { first }
    }

    fn apply<D: Driver>(&self, sc: SgdScalars, d: D) {
        let neg_lr = (-self.lr) as f32;
        let wd = self.weight_decay as f32;
        let use_wd = self.weight_decay != 0.0;
        let maximize = self.maximize;
        let grad = move |p: f32, g: f32| {
            let g = if maximize { -g } else { g };
            if use_wd {
                g + wd * p
            } else {
                g
            }
        };
        if self.momentum == 0.0 {
            d.run(move |p, g, []: [f32; 0]| (p + neg_lr * grad(p, g), []));
        } else {
            let m = self.momentum as f32;
            let keep = (1.0 - self.dampening) as f32;
            let (first, nesterov) = (sc.first, self.nesterov);
            d.run(move |p, g, [b]| {
                let g = grad(p, g);
                let b = if first { g } else { b * m + keep * g };
                let u = if nesterov { g + m * b } else { b };
                (p + neg_lr * u, [b])
            });
        }
    }
}
