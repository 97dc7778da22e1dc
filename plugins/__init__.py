"""vetd's shipped scanner plugins. Each one loads through the `vetd.plugins` entry-point group,
the same door a vendor's plugin uses."""
