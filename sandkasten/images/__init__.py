"""Sandbox images: root filesystems under `data_dir/images/NAME/rootfs`.

`ImageStore` reads and checks them (the runtime calls `ensure_valid` before it mounts an
overlay); `import_tar` and `build` write them (the `imgbuilder` command, as root).
"""

from sandkasten.images.build import build, build_base, build_python
from sandkasten.images.store import ImageInfo, ImageStore, check_name, resolve_inside
from sandkasten.images.tarimport import import_tar

__all__ = ["ImageInfo", "ImageStore", "build", "build_base", "build_python", "check_name", "import_tar",
           "resolve_inside"]
