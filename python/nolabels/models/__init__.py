"""Models: open_clip CLIP towers and their prompted variants."""
from nolabels.models.prompted_vit import PromptedVisionTransformer  # noqa: F401
