//! Hyperparameters as the user gave them (names and values as `torch.optim` spells them).

use crate::OptimError;

/// One hyperparameter value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HyperValue {
    /// A number (`lr`, `eps`, `momentum`, ...).
    Float(f64),
    /// A flag (`nesterov`, `amsgrad`, `maximize`, ...).
    Bool(bool),
    /// A pair (`betas`).
    Pair(f64, f64),
}

/// An ordered list of `(name, value)`.
pub type Hyperparameters = Vec<(String, HyperValue)>;

/// Typed lookup of hyperparameters that rejects unknown names.
pub(crate) struct HyperReader<'a> {
    optimizer: &'static str,
    given: &'a [(String, HyperValue)],
    accepted: &'static [&'static str],
}

impl<'a> HyperReader<'a> {
    /// Fails on any name not in `accepted`.
    pub(crate) fn new(
        optimizer: &'static str,
        given: &'a [(String, HyperValue)],
        accepted: &'static [&'static str],
    ) -> Result<Self, OptimError> {
        if let Some((name, _)) = given.iter().find(|(n, _)| !accepted.contains(&n.as_str())) {
            return Err(OptimError::UnknownHyperparameter {
                optimizer,
                name: name.clone(),
                accepted: accepted.join(", "),
            });
        }
        Ok(Self {
            optimizer,
            given,
            accepted,
        })
    }

    fn get(&self, name: &str) -> Option<HyperValue> {
        debug_assert!(self.accepted.contains(&name));
        self.given
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
    }

    /// A float, `default` when absent. Bools are refused; integers arrive as floats.
    pub(crate) fn float(&self, name: &str, default: f64) -> Result<f64, OptimError> {
        match self.get(name) {
            None => Ok(default),
            Some(HyperValue::Float(v)) => Ok(v),
            Some(_) => Err(self.wrong(name, "a number")),
        }
    }

    /// A flag, `default` when absent.
    pub(crate) fn flag(&self, name: &str, default: bool) -> Result<bool, OptimError> {
        match self.get(name) {
            None => Ok(default),
            Some(HyperValue::Bool(v)) => Ok(v),
            Some(_) => Err(self.wrong(name, "a bool")),
        }
    }

    /// A pair, `default` when absent.
    pub(crate) fn pair(&self, name: &str, default: (f64, f64)) -> Result<(f64, f64), OptimError> {
        match self.get(name) {
            None => Ok(default),
            Some(HyperValue::Pair(a, b)) => Ok((a, b)),
            Some(_) => Err(self.wrong(name, "a pair of numbers")),
        }
    }

    fn wrong(&self, name: &str, expected: &'static str) -> OptimError {
        OptimError::WrongType {
            optimizer: self.optimizer,
            name: name.to_string(),
            expected,
        }
    }

    /// `Err(OutOfRange)` unless `ok`.
    pub(crate) fn check(
        &self,
        ok: bool,
        name: &str,
        value: f64,
        reason: &'static str,
    ) -> Result<(), OptimError> {
        if ok {
            Ok(())
        } else {
            Err(OptimError::OutOfRange {
                optimizer: self.optimizer,
                name: name.to_string(),
                value: value.to_string(),
                reason,
            })
        }
    }
}

impl HyperReader<'_> {
    /// `value >= 0` (NaN refused), as torch's `if not 0.0 <= value` checks.
    pub(crate) fn nonneg(&self, name: &str, value: f64) -> Result<(), OptimError> {
        self.check(value >= 0.0, name, value, "must be >= 0")
    }

    /// A finite number.
    pub(crate) fn finite(&self, name: &str, value: f64) -> Result<(), OptimError> {
        self.check(value.is_finite(), name, value, "must be finite")
    }

    /// `0 <= value < 1`, as torch checks each of `betas`.
    pub(crate) fn beta(&self, name: &str, value: f64) -> Result<(), OptimError> {
        self.check(
            (0.0..1.0).contains(&value),
            name,
            value,
            "must be in [0, 1)",
        )
    }
}
