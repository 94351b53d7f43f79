# A small stand-in for nixpkgs' `lib`, enough to evaluate this project's flake and NixOS module
# offline (nixpkgs is not reachable from this project's CI). Stated as a stub: it is not nixpkgs.
#
# `evalModules` follows the NixOS module system's rules for what the module uses: modules are
# functions or attribute sets with `imports`, `options` and `config`; `mkIf` is pushed down to the
# options it defines (so a condition may read `config`), `mkOverride`/`mkDefault` pick the
# definitions of the highest priority (an option's default is 1500), `mkOrder`/`mkBefore` order
# list definitions; every definition is checked against its option's type, and a definition of an
# option nobody declared is an error, as in NixOS.
let
  inherit (builtins)
    all any attrNames concatLists concatMap elem filter foldl' head isAttrs isBool isFunction
    isInt isList isPath isString listToAttrs mapAttrs removeAttrs sort;

  kind = v: if isAttrs v then v._type or null else null;

  # A definition as a list of { priority, order, value } once its conditions hold.
  normalise = d:
    let k = kind d; in
    if k == "if" then (if d.condition then normalise d.content else [ ])
    else if k == "override" then map (x: x // { priority = d.priority; }) (normalise d.content)
    else if k == "order" then map (x: x // { order = d.priority; }) (normalise d.content)
    else [{ priority = 100; order = 1000; value = d; }];

  # The definitions of attribute `name` inside each definition (mkIf pushed down, unevaluated).
  descend = name: defs: concatMap
    (d:
      let k = kind d; in
      if k == "if" then map (x: lib.mkIf d.condition x) (descend name [ d.content ])
      else if isAttrs d && k == null && d ? ${name} then [ d.${name} ]
      else [ ])
    defs;

  # The attribute names a definition defines, without evaluating its conditions.
  namesOf = d:
    let k = kind d; in
    if k == "if" || k == "override" || k == "order" then namesOf d.content
    else if isAttrs d then attrNames d
    else [ ];

  showPath = path: builtins.concatStringsSep "." path;

  isOption = o: kind o == "option";

  evalOption = path: opt: defs:
    let
      given = concatMap normalise defs
        ++ (if opt ? default then [{ priority = 1500; order = 1000; value = opt.default; }] else [ ]);
      best = foldl' (p: x: if x.priority < p then x.priority else p) 1500 given;
      chosen = sort (a: b: a.order < b.order) (filter (x: x.priority == best) given);
      values = map (x: x.value) chosen;
      bad = filter (v: !(opt.type.check v)) values;
    in
    if chosen == [ ] then throw "The option `${showPath path}' is used but not defined."
    else if bad != [ ] then
      throw "A definition of option `${showPath path}' is not of type `${opt.type.name}'."
    else opt.type.merge path values;

  evalTree = path: opts: defs:
    let
      undeclared = filter (n: !(opts ? ${n})) (concatMap namesOf defs);
    in
    if undeclared != [ ] then
      throw "The option `${showPath (path ++ [ (head undeclared) ])}' does not exist."
    else mapAttrs
      (name: o:
        if isOption o then evalOption (path ++ [ name ]) o (descend name defs)
        else evalTree (path ++ [ name ]) o (descend name defs))
      opts;

  mergeOptions = a: b: a // mapAttrs
    (n: v:
      if a ? ${n} && !(isOption v) && !(isOption a.${n}) then mergeOptions a.${n} v
      else if a ? ${n} then throw "The option `${n}' is declared twice."
      else v)
    b;

  oneValue = path: vs:
    if all (v: v == head vs) vs then head vs
    else throw "The option `${showPath path}' has conflicting definitions.";

  # `anything`: attribute sets merge by name (their values again as `anything`), lists concatenate.
  mergeAnything = path: vs:
    if all isAttrs vs && all (v: kind v == null || kind v == "if") vs && !(any (v: v ? outPath) vs) then
      let names = lib.unique (concatMap namesOf vs); in
      listToAttrs (map
        (n: {
          name = n;
          value = mergeAnything (path ++ [ n ]) (map (x: x.value) (concatMap normalise (descend n vs)));
        })
        (filter (n: descend n vs != [ ]) names))
    else if all isList vs then concatLists vs
    else oneValue path vs;

  lib = rec {
    unique = foldl' (acc: x: if elem x acc then acc else acc ++ [ x ]) [ ];
    genAttrs = names: f: listToAttrs (map (n: { name = n; value = f n; }) names);
    optional = c: x: if c then [ x ] else [ ];
    optionals = c: l: if c then l else [ ];
    optionalString = c: s: if c then s else "";
    optionalAttrs = c: a: if c then a else { };
    cleanSourceWith = { src, filter ? (_: _: true), name ? "source" }:
      builtins.path { path = src; inherit filter name; };
    licenses.mit = { spdxId = "MIT"; shortName = "mit"; };
    platforms.linux = [ "x86_64-linux" "aarch64-linux" ];
    literalExpression = text: { _type = "literalExpression"; inherit text; };
    getExe = p: "${p}/bin/${p.meta.mainProgram}";

    mkOption = attrs: attrs // { _type = "option"; type = attrs.type or types.anything; };
    mkEnableOption = name: mkOption {
      type = types.bool;
      default = false;
      example = true;
      description = "Whether to enable ${name}.";
    };
    mkIf = condition: content: { _type = "if"; inherit condition content; };
    mkOverride = priority: content: { _type = "override"; inherit priority content; };
    mkDefault = mkOverride 1000;
    mkForce = mkOverride 50;
    mkOrder = priority: content: { _type = "order"; inherit priority content; };
    mkBefore = mkOrder 500;
    mkAfter = mkOrder 1500;

    types = rec {
      scalar = name: check: { inherit name check; merge = oneValue; };
      bool = scalar "bool" isBool;
      str = scalar "str" isString;
      int = scalar "int" isInt;
      port = scalar "port" (v: isInt v && v >= 0 && v <= 65535);
      path = scalar "path" (v: isPath v || isString v);
      package = scalar "package" (v: isAttrs v && (v.type or null) == "derivation");
      enum = values: scalar "one of ${builtins.toJSON values}" (v: elem v values);
      nullOr = t: t // { name = "null or ${t.name}"; check = v: v == null || t.check v; };
      listOf = t: {
        name = "list of ${t.name}";
        check = v: isList v && all t.check v;
        merge = _: concatLists;
        elemType = t;
      };
      attrsOf = t: {
        name = "attribute set of ${t.name}";
        check = isAttrs;
        merge = path: vs: mapAttrs
          (n: _: t.merge (path ++ [ n ]) (map (x: x.value) (concatMap normalise (descend n vs))))
          (listToAttrs (map (n: { name = n; value = null; }) (concatMap namesOf vs)));
        elemType = t;
      };
      anything = { name = "anything"; check = _: true; merge = mergeAnything; };
    };

    evalModules = { modules, specialArgs ? { } }:
      let
        args = specialArgs // { inherit lib config options; };
        # As in NixOS, a module function gets every argument (so it must take `...`).
        call = f: f args;
        load = m:
          let
            v0 = if isPath m || isString m then import m else m;
            v = if isFunction v0 then call v0 else v0;
          in
          [ v ] ++ concatMap load (v.imports or [ ]);
        mods = concatMap load modules;
        options = foldl' mergeOptions { } (map (m: m.options or { }) mods);
        config = evalTree [ ] options
          (map (m: if m ? config then m.config else removeAttrs m [ "options" "imports" ]) mods);
      in
      { inherit options config; };
  };
in
lib
