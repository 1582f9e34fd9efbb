"""Values shared by data, model and export code."""

IMAGE_TOKEN = "<image>"
# The id that stands for one image in token sequences, as in LLaVA (never embedded: replaced by features).
IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100
# Images with more pixels are refused before decoding unless the experiment's max_image_pixels says otherwise
# (PIL's decompression-bomb limit, Image.MAX_IMAGE_PIXELS).
MAX_IMAGE_PIXELS = 89_478_485
