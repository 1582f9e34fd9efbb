"""Values shared by data, model and export code."""

IMAGE_TOKEN = "<image>"
# The id that stands for one image in token sequences, as in LLaVA (never embedded: replaced by features).
IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100
