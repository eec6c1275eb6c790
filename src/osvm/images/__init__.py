"""Guest images for the microvm runtime: build, cache, list and remove them."""

from osvm.images.build import BuiltImage, ImageError, build_image, find_image, get_image, list_images, remove_image
from osvm.images.usage import ImageInUseError, ImageUser, image_users, remove_image_unless_used

__all__ = [
    "BuiltImage",
    "ImageError",
    "ImageInUseError",
    "ImageUser",
    "build_image",
    "find_image",
    "get_image",
    "image_users",
    "list_images",
    "remove_image",
    "remove_image_unless_used",
]
