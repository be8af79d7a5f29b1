# Installation and the Debian package.
#
#   cmake --install build --prefix /usr/local   # bin/bscache, man page, examples
#   scripts/package.sh                          # dist/bscache_VERSION_ARCH.deb
#
# The man page is generated from `bscache --help` by help2man (plus
# doc/bscache.h2m for the sections --help has no room for), so it cannot drift
# from the options table; a test checks that every option is in it.
include(GNUInstallDirs)

option(BSCACHE_INSTALL_SYSTEMD_UNITS
       "Install the systemd units into lib/systemd/system instead of only as examples in share/doc/bscache" OFF)

find_program(HELP2MAN help2man)
if(NOT HELP2MAN)
  message(FATAL_ERROR "help2man not found (it makes the man page): run scripts/deps.sh")
endif()
set(BSCACHE_MANPAGE ${CMAKE_BINARY_DIR}/bscache.1)
add_custom_command(
  OUTPUT ${BSCACHE_MANPAGE}
  COMMAND ${HELP2MAN} --no-info --section=1 "--name=a caching block-status proxy for NBD"
          --include=${CMAKE_SOURCE_DIR}/doc/bscache.h2m --output=${BSCACHE_MANPAGE} $<TARGET_FILE:bscache>
  DEPENDS bscache ${CMAKE_SOURCE_DIR}/doc/bscache.h2m
  COMMENT "Generating the man page bscache.1 from --help"
  VERBATIM)
# Installed compressed, as Debian's policy asks (-n: no timestamp, reproducible).
add_custom_command(
  OUTPUT ${BSCACHE_MANPAGE}.gz
  COMMAND gzip -9nkf ${BSCACHE_MANPAGE}
  DEPENDS ${BSCACHE_MANPAGE}
  VERBATIM)
# The example config file is --print-config's output: every option with its
# help and default, so it cannot drift from the options table either.
set(BSCACHE_EXAMPLE_CONF ${CMAKE_BINARY_DIR}/bscache.conf.example)
add_custom_command(
  OUTPUT ${BSCACHE_EXAMPLE_CONF}
  COMMAND sh -c "\"$1\" --print-config > \"$2\"" sh $<TARGET_FILE:bscache> ${BSCACHE_EXAMPLE_CONF}
  DEPENDS bscache
  VERBATIM)
add_custom_target(manpage ALL DEPENDS ${BSCACHE_MANPAGE} ${BSCACHE_MANPAGE}.gz ${BSCACHE_EXAMPLE_CONF})

install(TARGETS bscache RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
install(FILES ${BSCACHE_MANPAGE}.gz DESTINATION ${CMAKE_INSTALL_MANDIR}/man1)
set(units contrib/bscache@.service contrib/bscache@.socket)
install(FILES ${units} ${BSCACHE_EXAMPLE_CONF} contrib/grafana/bscache.json README.md
        DESTINATION ${CMAKE_INSTALL_DOCDIR})
if(BSCACHE_INSTALL_SYSTEMD_UNITS)
  install(FILES ${units} DESTINATION lib/systemd/system)
endif()

# CPack's DEB generator. Depends: comes from the shared libraries the binary
# links (dpkg-shlibdeps, from dpkg-dev), so it names exactly the Debian
# packages this build needs (libnbd0, libspdlog1.10, libboost-program-options…).
set(CPACK_GENERATOR DEB)
set(CPACK_PACKAGE_NAME bscache)
set(CPACK_PACKAGE_VENDOR "bscache")
set(CPACK_PACKAGE_CONTACT "bscache maintainers <bscache@localhost>")
set(CPACK_PACKAGE_DESCRIPTION_SUMMARY "caching block-status proxy for NBD")
set(CPACK_PACKAGE_DESCRIPTION
    "bscache sits between NBD clients and an upstream NBD server and answers block-status queries from an interval cache.")
set(CPACK_PACKAGING_INSTALL_PREFIX /usr)
set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)
set(CPACK_DEBIAN_PACKAGE_SECTION admin)
set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS ON)
set(CPACK_DEBIAN_PACKAGE_SUGGESTS "nbdkit, qemu-utils, libnbd-bin")
set(CPACK_STRIP_FILES ON)
include(CPack)
