"""MIL models (one registry) and their heads.

    create_model(name, in_dim, n_classes, **kw)   names: mamba2d, mamba1d, abmil, meanpool, transmil
    model(features (B,H,W,in_dim), mask (B,H,W) bool, sizes=None (B,2)) -> logits (B, n_classes)
    model.last_attention: (B,H,W) pooling weights of the last forward (zero off tissue)
    classification_loss(logits, label); nll_survival_loss(hazard_logits, time_bin, censorship, alpha=0.0)
    survival_risk(hazard_logits) = -Σ survival; survival_curve(hazard_logits)
"""

from gigamamba.models import mil, transmil  # noqa: F401  (registers the models)
from gigamamba.models.registry import create_model, list_models, register_model
from gigamamba.models.survival import classification_loss, nll_survival_loss, survival_curve, survival_risk

__all__ = ["create_model", "list_models", "register_model", "classification_loss", "nll_survival_loss",
           "survival_curve", "survival_risk"]
