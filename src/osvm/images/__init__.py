"""Guest images for the microvm runtime: build, cache, list and remove them."""

from osvm.images.build import BuiltImage, ImageError, build_image, find_image, list_images, remove_image

__all__ = ["BuiltImage", "ImageError", "build_image", "find_image", "list_images", "remove_image"]
