"""The organism's image processor, chat template and LlavaProcessor."""

from __future__ import annotations

from transformers import CLIPImageProcessor, LlavaProcessor

from vtrlab.organism.tokenizer import ASSISTANT, END, IMAGE, SYSTEM, SYSTEM_PROMPT, build_tokenizer

IMAGE_SIZE = 128
PATCH_SIZE = 8
GRID = IMAGE_SIZE // PATCH_SIZE
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)

# One turn renders as "<|role|>" + content + "<|end|>"; images become one <image> placeholder
# that LlavaProcessor expands to GRID*GRID tokens. The template fixes where the image goes,
# whatever the order of the content items: before the text (LLaVA's convention) or after it.
_IMAGES = "{% for item in message['content'] %}{% if item['type'] == 'image' %}" + IMAGE + "{% endif %}{% endfor %}"
_TEXTS = (
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ ' ' ~ item['text'] }}{% endif %}{% endfor %}"
)


def chat_template(image_first: bool = True) -> str:
    parts = (_IMAGES, _TEXTS) if image_first else (_TEXTS, _IMAGES.replace(IMAGE, " " + IMAGE))
    return _TEMPLATE.replace("@CONTENT@", "".join(parts))


_TEMPLATE = (
    "{{ bos_token }}"
    # LLaVA-1.5's order: a short system prompt (this default unless the conversation brings its own)
    "{% if messages[0]['role'] != 'system' %}" + SYSTEM + " " + SYSTEM_PROMPT + END + "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' ~ message['role'] ~ '; accepted: system, user, assistant') }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>"
    "{% if message['content'] is string %}{{ ' ' ~ message['content'] }}"
    "{% else %}"
    "@CONTENT@"
    "{% endif %}" + END + "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)


def build_image_processor() -> CLIPImageProcessor:
    # a plain resize to 128x128 (a no-op for the synthetic pictures): no crop that could cut
    # off an object and invalidate the relevance masks
    return CLIPImageProcessor(
        do_resize=True,
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=3,
        do_center_crop=False,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
        do_convert_rgb=True,
    )


def build_processor(image_first: bool = True) -> LlavaProcessor:
    """The organism's processor: system prompt, then (``image_first``, LLaVA-1.5's order and the
    trained organism's) the image, then the question; ``image_first=False`` puts the question first."""
    return LlavaProcessor(
        image_processor=build_image_processor(),
        tokenizer=build_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=chat_template(image_first),
        image_token=IMAGE,
        num_additional_image_tokens=1,  # the CLIP [CLS] token, dropped by the "default" strategy
    )


def user_message(question: str) -> list[dict]:
    """The one-turn conversation the organism is trained on: one image, then the question."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
