"""One module per dataset format; importing this package registers them all."""

from etf.data.datasets import (  # noqa: F401
    affectnet,
    agedb,
    au,
    celeba,
    cfp,
    csvfile,
    fer2013,
    ferplus,
    folder,
    lfw,
    lfw_subset,
    pose,
    rafdb,
    utkface,
    w300,
    wflw,
)
