/*
  eicar.yar: the EICAR anti-malware test file, as the standard defines it.

  The file starts with the 68-byte string below, at offset 0. It may be followed by whitespace
  only (space, tab, LF, CR, Ctrl-Z), and the whole file is at most 128 bytes. The same string
  anywhere else (inside an archive, in this very file, in a test suite) is not the test file.
*/

rule EICAR_Test_File : test
{
    meta:
        description = "EICAR anti-malware test file (harmless; used to check that scanning works)"
        reference = "https://www.eicar.org/download-anti-malware-testfile/"

    strings:
        $eicar = "X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"

    condition:
        $eicar at 0 and filesize <= 128 and (
            filesize == 68 or  // an empty range (68 .. 67) would make the loop below false
            for all i in (68 .. filesize - 1) : (
                uint8(i) == 0x20 or uint8(i) == 0x09 or uint8(i) == 0x0A or uint8(i) == 0x0D or
                uint8(i) == 0x1A
            )
        )
}
