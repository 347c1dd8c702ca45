# Sourced by the text fetchers: one pinned Debian package, downloaded (apt-get, no root), its
# sha256 checked, and unpacked into ./extracted of the current folder.
#
#   fetch_package NAME VERSION DEB SHA256
fetch_package() {
    local name=$1 version=$2 deb=$3 sha256=$4
    apt-get download -q "$name=$version" >/dev/null 2>&1 || apt-get download "$name=$version"
    echo "$sha256  $deb" | sha256sum -c --quiet -
    dpkg-deb -x "$deb" extracted
}
