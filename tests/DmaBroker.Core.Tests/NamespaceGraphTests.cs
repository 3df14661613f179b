using System.Reflection;
using System.Reflection.Emit;

namespace DmaBroker.Core.Tests;

/// <summary>
/// The core's namespaces depend on each other one way only (docs/core-namespaces.md). The graph is
/// read from the compiled assembly: every type a type names in its base types, fields and
/// signatures, and every type, method and field its method bodies use, so a fully qualified name
/// in a method body counts as much as a <c>using</c>.
/// </summary>
public sealed class NamespaceGraphTests
{
    private const string Root = "DmaBroker.Core";

    /// <summary>
    /// The root namespace holds two things: the foundation every namespace uses (errno, PCI
    /// address, driver names) and <see cref="Broker"/>, which composes every namespace. They are
    /// two nodes of the graph, one at each end.
    /// </summary>
    private const string Composition = Root + " (Broker)";

    private static readonly HashSet<Type> CompositionTypes = [typeof(Broker), typeof(BrokerOptions), typeof(BrokerStats)];

    private static readonly Lazy<Dictionary<string, Dictionary<string, string>>> Graph = new(Build);

    [Fact]
    public void NamespaceGraph_Core_HasNoCycle()
    {
        var cycle = FindCycle(Graph.Value);

        Assert.True(cycle is null, cycle is null ? "" : "namespace cycle:\n" + string.Join('\n',
            cycle.Zip(cycle.Skip(1), (from, to) => $"  {from} -> {to}   ({Graph.Value[from][to]})")));
    }

    [Fact]
    public void NamespaceGraph_RootFoundation_DependsOnNoOtherNamespace()
    {
        var uses = Graph.Value.GetValueOrDefault(Root) ?? [];

        Assert.True(uses.Count == 0, "the root foundation uses " + string.Join(", ", uses.Select(u => $"{u.Key} ({u.Value})")));
    }

    [Fact]
    public void NamespaceGraph_Broker_IsUsedByNoNamespace()
    {
        var users = Graph.Value.Where(n => n.Value.ContainsKey(Composition)).Select(n => $"{n.Key} ({n.Value[Composition]})");

        Assert.Empty(users);
    }

    /// <summary>Namespace → the namespaces it uses, each with one example of the use.</summary>
    private static Dictionary<string, Dictionary<string, string>> Build()
    {
        var graph = new Dictionary<string, Dictionary<string, string>>();
        foreach (var type in typeof(Broker).Assembly.GetTypes())
        {
            if (NodeOf(type) is not { } from)
                continue;
            foreach (var (used, how) in Uses(type))
            {
                if (NodeOf(used) is { } to && to != from)
                {
                    var edges = graph.TryGetValue(from, out var e) ? e : graph[from] = [];
                    edges.TryAdd(to, $"{Name(type)} {how} {Name(used)}");
                }
            }
        }
        return graph;
    }

    /// <summary>The graph node of a core type, or null for a type outside the core (or generated without a namespace).</summary>
    private static string? NodeOf(Type type)
    {
        while (type.IsNested)
            type = type.DeclaringType!;
        if (type.Namespace is not { } ns || !(ns == Root || ns.StartsWith(Root + ".", StringComparison.Ordinal)))
            return null;
        return CompositionTypes.Contains(type) ? Composition : ns;
    }

    private static IEnumerable<(Type Used, string How)> Uses(Type type)
    {
        const BindingFlags all = BindingFlags.Public | BindingFlags.NonPublic | BindingFlags.Instance | BindingFlags.Static | BindingFlags.DeclaredOnly;
        foreach (var t in Flatten(type.BaseType))
            yield return (t, "derives from");
        foreach (var t in type.GetInterfaces().SelectMany(Flatten))
            yield return (t, "implements");
        foreach (var field in type.GetFields(all))
        {
            foreach (var t in Flatten(field.FieldType))
                yield return (t, $"has field {field.Name} of");
        }
        foreach (var method in type.GetMethods(all).Cast<MethodBase>().Concat(type.GetConstructors(all)))
        {
            var signature = method.GetParameters().Select(p => p.ParameterType)
                .Concat(method is MethodInfo m ? [m.ReturnType] : []);
            foreach (var t in signature.SelectMany(Flatten))
                yield return (t, $"has {method.Name}() taking or returning");
            foreach (var member in BodyReferences(method))
            {
                var used = member as Type ?? member.DeclaringType;
                foreach (var t in Flatten(used))
                    yield return (t, $"in {method.Name}() uses");
            }
        }
    }

    /// <summary>A type with its element and generic argument types.</summary>
    private static IEnumerable<Type> Flatten(Type? type)
    {
        if (type is null)
            yield break;
        if (type.HasElementType)
        {
            foreach (var t in Flatten(type.GetElementType()))
                yield return t;
            yield break;
        }
        if (type.IsGenericParameter)
            yield break;
        yield return type;
        if (type.IsGenericType && !type.IsGenericTypeDefinition)
        {
            foreach (var t in type.GetGenericArguments().SelectMany(Flatten))
                yield return t;
        }
    }

    /// <summary>The types, methods and fields a method body names, read from its IL.</summary>
    private static IEnumerable<MemberInfo> BodyReferences(MethodBase method)
    {
        var il = method.GetMethodBody()?.GetILAsByteArray();
        if (il is null)
            yield break;
        var typeArgs = method.DeclaringType is { IsGenericType: true } d ? d.GetGenericArguments() : null;
        var methodArgs = method.IsGenericMethod ? method.GetGenericArguments() : null;
        var at = 0;
        while (at < il.Length)
        {
            var code = il[at] == 0xfe ? TwoByte[il[at + 1]] : OneByte[il[at]];
            at += code.Size;
            switch (code.OperandType)
            {
                case OperandType.InlineField or OperandType.InlineMethod or OperandType.InlineTok or OperandType.InlineType:
                    yield return method.Module.ResolveMember(BitConverter.ToInt32(il, at), typeArgs, methodArgs)!;
                    at += 4;
                    break;
                case OperandType.InlineSwitch:
                    at += 4 + (4 * BitConverter.ToInt32(il, at));
                    break;
                default:
                    at += OperandSize(code.OperandType);
                    break;
            }
        }
    }

    private static int OperandSize(OperandType operand) => operand switch
    {
        OperandType.InlineNone => 0,
        OperandType.ShortInlineBrTarget or OperandType.ShortInlineI or OperandType.ShortInlineVar => 1,
        OperandType.InlineVar => 2,
        OperandType.InlineI8 or OperandType.InlineR => 8,
        _ => 4,
    };

    private static readonly OpCode[] OneByte = new OpCode[256];
    private static readonly OpCode[] TwoByte = new OpCode[256];

    static NamespaceGraphTests()
    {
        foreach (var field in typeof(OpCodes).GetFields(BindingFlags.Public | BindingFlags.Static))
        {
            var code = (OpCode)field.GetValue(null)!;
            var value = (ushort)code.Value;
            if (code.Size == 1)
                OneByte[value] = code;
            else
                TwoByte[value & 0xff] = code;
        }
    }

    /// <summary>A cycle as a path that ends where it starts, or null when there is none.</summary>
    private static List<string>? FindCycle(Dictionary<string, Dictionary<string, string>> graph)
    {
        var state = new Dictionary<string, bool>(); // false: on the current path; true: done
        var path = new List<string>();

        List<string>? Visit(string node)
        {
            if (state.TryGetValue(node, out var done))
                return done ? null : [.. path.SkipWhile(n => n != node), node];
            state[node] = false;
            path.Add(node);
            foreach (var next in graph.GetValueOrDefault(node)?.Keys ?? Enumerable.Empty<string>())
            {
                if (Visit(next) is { } cycle)
                    return cycle;
            }
            path.RemoveAt(path.Count - 1);
            state[node] = true;
            return null;
        }

        return graph.Keys.Order(StringComparer.Ordinal).Select(Visit).FirstOrDefault(c => c is not null);
    }

    private static string Name(Type type) => type.IsNested ? $"{Name(type.DeclaringType!)}.{type.Name}" : type.Name;
}
