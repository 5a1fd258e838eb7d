"""One module per dataset format; importing this package registers them all."""

from etf.data.datasets import (  # noqa: F401
    affectnet,
    agedb,
    au,
    celeba,
    csvfile,
    fer2013,
    ferplus,
    folder,
    lfw_subset,
    pose,
    rafdb,
    utkface,
    w300,
    wflw,
)
