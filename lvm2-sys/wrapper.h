#include <lvm2cmd.h>
