#include "../include/derived_cache.h"

namespace convnext_fast {

DerivedCache& derived_cache() {
  static DerivedCache cache;
  return cache;
}

}  // namespace convnext_fast
